//! Helpers for the integration tests: starting servers on port 0, running
//! real NBD clients, making images.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod client;
pub mod http;
pub mod ports;
pub mod seaweed;
pub mod support;
