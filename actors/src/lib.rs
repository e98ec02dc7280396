//! The supervised actor runtime: a `Supervisor` owning the device, cache, vision
//! and decoder actors, and the `Runtime` handle through which every interface
//! (IPC, HTTP, zenoh) submits requests.
//!
//! Inference never runs on async worker threads: the decoder drives the engine on
//! a dedicated OS thread and talks to the actor world through channels.
#![warn(missing_docs)]
