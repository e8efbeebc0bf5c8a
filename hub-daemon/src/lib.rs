//! The NBD backup hub daemon.
//!
//! # Layout
//! * [`cli`]: argument parsing and the foreground commands.
#![deny(missing_docs)]

pub mod cli;
