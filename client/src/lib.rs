//! The local client library for embodyd: connects to the daemon's Unix socket and
//! streams answers. It depends on `embody-protocol` only, so robot programs that
//! link it stay light.
#![warn(missing_docs)]
