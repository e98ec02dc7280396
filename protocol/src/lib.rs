//! The vocabulary shared by every interface of embodyd and by the client library:
//! chat messages, image inputs, sampling parameters, the request type and the
//! stream of events that answers it.
//!
//! This crate stays free of heavy dependencies (serde only) so that the client
//! library linked into robot programs stays light. The types arrive with the daemon.
#![warn(missing_docs)]
