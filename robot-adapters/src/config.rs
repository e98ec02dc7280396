//! The `[zenoh]`, `[ros2]`, `[[cameras]]` and `[[tasks]]` sections of the
//! daemon's configuration. `configs/default.toml` documents every field with
//! its default; `docs/zenoh.md` shows them at work.

use serde::{Deserialize, Serialize};

use crate::Error;

/// `[zenoh]`: the zenoh session and the key space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZenohConfig {
    /// Serve over zenoh at all. Default: true.
    pub enabled: bool,
    /// "peer" (rmw_zenoh's default), "client" or "router". Default: "peer".
    pub mode: String,
    /// Endpoints to connect to. A router that is not running is retried in
    /// the background, never an error. Default: ["tcp/127.0.0.1:7447"].
    pub connect: Vec<String>,
    /// Endpoints to listen on, so local zenoh programs can reach the daemon
    /// directly. Default: ["tcp/127.0.0.1:7448"].
    pub listen: Vec<String>,
    /// Find peers by UDP multicast scouting. Default: false.
    pub multicast_scouting: bool,
    /// A zenoh configuration file (JSON5) for what is not set here (TLS,
    /// access control); the fields above apply over it. Empty: none. Default: "".
    pub config_file: String,
    /// The node name in the key space; empty: the host name, else "embodyd".
    /// Default: "".
    pub node: String,
    /// The key space's prefix; empty: "embody/<node>". Default: "".
    pub prefix: String,
    /// Most bytes of one zenoh message the session takes in (a chat
    /// payload, a camera frame); zenoh's own default is 1 GiB. Default:
    /// 33554432.
    pub max_message_bytes: usize,
}

impl Default for ZenohConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: "peer".into(),
            connect: vec!["tcp/127.0.0.1:7447".into()],
            listen: vec!["tcp/127.0.0.1:7448".into()],
            multicast_scouting: false,
            config_file: String::new(),
            node: String::new(),
            prefix: String::new(),
            max_message_bytes: 32 << 20,
        }
    }
}

impl ZenohConfig {
    /// The node name: `node`, else the host name, else "embodyd".
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        hostname()
            .filter(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            .unwrap_or_else(|| "embodyd".into())
    }

    /// The key space's prefix: `prefix`, else `embody/<node>`.
    pub fn key_prefix(&self) -> String {
        if !self.prefix.is_empty() {
            return self.prefix.trim_end_matches('/').to_string();
        }
        format!("embody/{}", self.node_name())
    }

    /// Checks what can be checked before the session opens.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_message_bytes < 65536 {
            return Err(Error::Config(format!(
                "zenoh.max_message_bytes must be at least 65536, not {}",
                self.max_message_bytes
            )));
        }
        if !matches!(self.mode.as_str(), "peer" | "client" | "router") {
            return Err(Error::Config(format!(
                "zenoh.mode must be \"peer\", \"client\" or \"router\", not {:?}",
                self.mode
            )));
        }
        let prefix = self.key_prefix();
        zenoh::key_expr::KeyExpr::try_from(prefix.as_str())
            .ok()
            .filter(|_| !prefix.contains(['*', '$', '?', '#']))
            .ok_or_else(|| {
                Error::Config(format!(
                    "zenoh.prefix {prefix:?} is not a plain key expression (no wildcards, no empty chunks)"
                ))
            })?;
        Ok(())
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// `[ros2]`: the daemon as a ROS 2 node, as rmw_zenoh puts it on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ros2Config {
    /// Appear as a ROS 2 node (needs `[zenoh]`). Default: true.
    pub enabled: bool,
    /// The ROS domain id (`ROS_DOMAIN_ID`). Default: 0.
    pub domain_id: u32,
    /// The node's name. Default: "embodyd".
    pub node: String,
    /// The node's namespace. Default: "/".
    pub namespace: String,
    /// `std_msgs/msg/String` prompts arrive here. Default: "/embodyd/prompt".
    pub prompt_topic: String,
    /// Answers leave here as `std_msgs/msg/String`. Default: "/embodyd/answer".
    pub answer_topic: String,
    /// Attach this camera's latest frame to every prompt; empty: none. Default: "".
    pub prompt_camera: String,
    /// The model that answers the prompts (a `[[models]]` name); empty: the
    /// daemon's first model. Default: "".
    pub prompt_model: String,
    /// Most tokens of an answer; 0: the daemon's default. Default: 0.
    pub max_tokens: u32,
}

impl Default for Ros2Config {
    fn default() -> Self {
        Self {
            enabled: true,
            domain_id: 0,
            node: "embodyd".into(),
            namespace: "/".into(),
            prompt_topic: "/embodyd/prompt".into(),
            answer_topic: "/embodyd/answer".into(),
            prompt_camera: String::new(),
            prompt_model: String::new(),
            max_tokens: 0,
        }
    }
}

/// How a camera's frames are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CameraFormat {
    /// Raw 8-bit RGB pixels, row by row (needs `width` and `height`).
    Rgb8,
    /// Raw 8-bit BGR pixels, row by row (needs `width` and `height`).
    Bgr8,
    /// A JPEG file.
    Jpeg,
    /// A PNG file.
    Png,
    /// ROS 2 `sensor_msgs/msg/Image` in CDR, through rmw_zenoh.
    Ros2Image,
    /// ROS 2 `sensor_msgs/msg/CompressedImage` in CDR, through rmw_zenoh.
    Ros2CompressedImage,
}

impl CameraFormat {
    /// Whether frames come as ROS 2 messages (`key` is then a topic name).
    pub fn is_ros2(self) -> bool {
        matches!(
            self,
            CameraFormat::Ros2Image | CameraFormat::Ros2CompressedImage
        )
    }
}

/// One `[[cameras]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// The name requests use to attach its latest frame.
    pub name: String,
    /// The zenoh key expression frames arrive on; for the ROS 2 formats, the
    /// ROS topic name (such as "/camera/image_raw").
    pub key: String,
    /// The frames' format.
    pub format: CameraFormat,
    /// Width in pixels, for the raw formats.
    #[serde(default)]
    pub width: u32,
    /// Height in pixels, for the raw formats.
    #[serde(default)]
    pub height: u32,
    /// Larger messages are refused before they are decoded. Default: 16 MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Frames wider or taller than this are refused before they are decoded.
    /// Default: 4096.
    #[serde(default = "default_max_dimension")]
    pub max_dimension: u32,
}

fn default_max_bytes() -> usize {
    16 << 20
}

fn default_max_dimension() -> u32 {
    4096
}

/// One `[[tasks]]` entry: a prompt about a camera, run periodically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// The task's name (in its results and its default key).
    pub name: String,
    /// The camera whose latest frame goes with the prompt.
    pub camera: String,
    /// The question.
    pub prompt: String,
    /// Run every this many ms; a run still going skips the tick. Default: 1000.
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
    /// Results are published here; empty: "<prefix>/tasks/<name>".
    #[serde(default)]
    pub key: String,
    /// Also publish results on this ROS 2 topic as `std_msgs/msg/String`
    /// holding the JSON; empty: not on ROS 2.
    #[serde(default)]
    pub ros2_topic: String,
    /// Most tokens of an answer. Default: 64.
    #[serde(default = "default_task_tokens")]
    pub max_tokens: u32,
    /// Skip a tick when the camera's latest frame is older than this. Default: 1000.
    #[serde(default = "default_period_ms")]
    pub max_age_ms: u64,
    /// A JSON schema (as a JSON string) the answer must follow; passed as
    /// the request's `response_format`. Empty: free text.
    #[serde(default)]
    pub schema: String,
    /// The model that runs the task (a `[[models]]` name); empty: the
    /// daemon's first model.
    #[serde(default)]
    pub model: String,
}

fn default_period_ms() -> u64 {
    1000
}

fn default_task_tokens() -> u32 {
    64
}

impl TaskConfig {
    /// The `response_format` for `schema`, if there is one.
    pub fn response_format(&self) -> Result<Option<serde_json::Value>, Error> {
        if self.schema.trim().is_empty() {
            return Ok(None);
        }
        let schema: serde_json::Value = serde_json::from_str(&self.schema).map_err(|e| {
            Error::Config(format!("tasks '{}': schema is not JSON: {e}", self.name))
        })?;
        Ok(Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": { "name": self.name, "schema": schema, "strict": true },
        })))
    }
}

/// Everything robot-facing, as the daemon's configuration holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdaptersConfig {
    /// `[zenoh]`
    pub zenoh: ZenohConfig,
    /// `[ros2]`
    pub ros2: Ros2Config,
    /// `[[cameras]]`
    pub cameras: Vec<CameraConfig>,
    /// `[[tasks]]`
    pub tasks: Vec<TaskConfig>,
}

impl AdaptersConfig {
    /// Checks the sections together: names are unique, tasks name configured
    /// cameras, raw formats have a size.
    pub fn validate(&self) -> Result<(), Error> {
        self.zenoh.validate()?;
        let bad = |m: String| Err(Error::Config(m));
        let mut names = std::collections::HashSet::new();
        for c in &self.cameras {
            if c.max_bytes > self.zenoh.max_message_bytes {
                return bad(format!(
                    "cameras '{}': max_bytes {} is over zenoh.max_message_bytes {}: no frame that large can arrive",
                    c.name, c.max_bytes, self.zenoh.max_message_bytes
                ));
            }
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                return bad(format!(
                    "cameras: the name {:?} is empty or used twice",
                    c.name
                ));
            }
            if c.key.is_empty() {
                return bad(format!("cameras '{}': key is empty", c.name));
            }
            let raw = matches!(c.format, CameraFormat::Rgb8 | CameraFormat::Bgr8);
            if raw && (c.width == 0 || c.height == 0) {
                return bad(format!(
                    "cameras '{}': the raw formats need width and height",
                    c.name
                ));
            }
            if raw && (c.width > c.max_dimension || c.height > c.max_dimension) {
                return bad(format!(
                    "cameras '{}': {}x{} is over max_dimension = {}",
                    c.name, c.width, c.height, c.max_dimension
                ));
            }
            if !c.format.is_ros2() && zenoh::key_expr::KeyExpr::try_from(c.key.as_str()).is_err() {
                return bad(format!(
                    "cameras '{}': key {:?} is not a zenoh key expression",
                    c.name, c.key
                ));
            }
            if c.format.is_ros2() && !c.key.starts_with('/') {
                return bad(format!(
                    "cameras '{}': for the ROS 2 formats, key is a topic name starting with '/'",
                    c.name
                ));
            }
        }
        if !self.ros2.prompt_camera.is_empty() && !names.contains(self.ros2.prompt_camera.as_str())
        {
            return bad(format!(
                "ros2.prompt_camera names no configured camera: {:?}",
                self.ros2.prompt_camera
            ));
        }
        let mut tasks = std::collections::HashSet::new();
        for t in &self.tasks {
            if t.name.is_empty() || !tasks.insert(t.name.as_str()) {
                return bad(format!(
                    "tasks: the name {:?} is empty or used twice",
                    t.name
                ));
            }
            if !names.contains(t.camera.as_str()) {
                return bad(format!(
                    "tasks '{}': camera {:?} is not one of the [[cameras]]",
                    t.name, t.camera
                ));
            }
            if t.period_ms == 0 || t.max_tokens == 0 {
                return bad(format!(
                    "tasks '{}': period_ms and max_tokens must be at least 1",
                    t.name
                ));
            }
            let plain = |k: &str| {
                zenoh::key_expr::KeyExpr::try_from(k).is_ok() && !k.contains(['*', '$', '?', '#'])
            };
            if !t.key.is_empty() && !plain(&t.key) {
                return bad(format!(
                    "tasks '{}': key {:?} is not a plain zenoh key (no wildcards)",
                    t.name, t.key
                ));
            }
            if !t.ros2_topic.is_empty() && !t.ros2_topic.starts_with('/') {
                return bad(format!(
                    "tasks '{}': ros2_topic {:?} must start with '/'",
                    t.name, t.ros2_topic
                ));
            }
            t.response_format()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn camera(name: &str, key: &str, format: CameraFormat) -> CameraConfig {
        CameraConfig {
            name: name.into(),
            key: key.into(),
            format,
            width: 0,
            height: 0,
            max_bytes: default_max_bytes(),
            max_dimension: default_max_dimension(),
        }
    }

    fn task(name: &str, camera: &str) -> TaskConfig {
        TaskConfig {
            name: name.into(),
            camera: camera.into(),
            prompt: "what?".into(),
            period_ms: 1000,
            key: String::new(),
            ros2_topic: String::new(),
            max_tokens: 8,
            max_age_ms: 1000,
            schema: String::new(),
            model: String::new(),
        }
    }

    #[test]
    fn the_default_prefix_names_the_node() {
        let z = ZenohConfig {
            node: "arm1".into(),
            ..ZenohConfig::default()
        };
        assert_eq!(z.key_prefix(), "embody/arm1");
        let z = ZenohConfig {
            prefix: "lab/robots/arm1/".into(),
            ..ZenohConfig::default()
        };
        assert_eq!(z.key_prefix(), "lab/robots/arm1");
        assert!(ZenohConfig::default().validate().is_ok());
    }

    #[test]
    fn inconsistent_sections_are_named() {
        let check = |cfg: AdaptersConfig| cfg.validate().unwrap_err().to_string();
        let mut cfg = AdaptersConfig::default();
        cfg.zenoh.prefix = "embody/*".into();
        assert!(check(cfg).contains("not a plain key expression"));

        let mut cfg = AdaptersConfig::default();
        cfg.cameras
            .push(camera("front", "cam/front", CameraFormat::Rgb8));
        assert!(check(cfg.clone()).contains("the raw formats need width and height"));
        cfg.cameras[0].format = CameraFormat::Ros2Image;
        assert!(check(cfg.clone()).contains("a topic name starting with '/'"));
        cfg.cameras[0].format = CameraFormat::Jpeg;
        cfg.cameras[0].max_bytes = cfg.zenoh.max_message_bytes + 1;
        assert!(check(cfg.clone()).contains("over zenoh.max_message_bytes"));
        cfg.cameras[0].max_bytes = cfg.zenoh.max_message_bytes;
        cfg.cameras
            .push(camera("front", "cam/2", CameraFormat::Png));
        assert!(check(cfg.clone()).contains("used twice"));
        cfg.cameras.pop();

        cfg.tasks.push(task("door", "rear"));
        assert!(check(cfg.clone()).contains("camera \"rear\" is not one of the [[cameras]]"));
        cfg.tasks[0].camera = "front".into();
        cfg.tasks[0].key = "results/**".into();
        assert!(check(cfg.clone()).contains("not a plain zenoh key"));
        cfg.tasks[0].key = String::new();
        cfg.tasks[0].schema = "{not json".into();
        assert!(check(cfg.clone()).contains("schema is not JSON"));
        cfg.tasks[0].schema = r#"{"type":"object"}"#.into();
        assert!(cfg.validate().is_ok());
        let rf = cfg.tasks[0].response_format().unwrap().unwrap();
        assert_eq!(rf["type"], "json_schema");
        assert_eq!(rf["json_schema"]["schema"]["type"], "object");
    }
}
