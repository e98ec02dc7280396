//! Robot-side interfaces: the zenoh key space (`embody/<node>/...`), ROS 2 topics
//! as rmw_zenoh puts them on the wire, camera ingestion (latest frame wins) and
//! periodic perception tasks.
#![warn(missing_docs)]
