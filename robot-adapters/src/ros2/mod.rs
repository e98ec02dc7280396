//! ROS 2 through rmw_zenoh: embodyd appears as a node, takes
//! `std_msgs/msg/String` prompts, answers with `std_msgs/msg/String`, and
//! reads camera topics (`sensor_msgs/msg/Image`, `sensor_msgs/msg/CompressedImage`).
//! [`wire`] holds the key, attachment and liveliness formats, [`cdr`] the
//! encoding, [`msgs`] the messages.

pub mod cdr;
pub mod msgs;
mod node;
pub mod wire;

pub(crate) use node::{PromptLoop, RosNode, RosPublisher};
