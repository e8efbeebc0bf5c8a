//! Restore-point lifecycle: which restore points a retention policy keeps
//! ([`retention`]), and what removing the others means for the image chains
//! built on them ([`chains`]): pure planning, no I/O, the prune executor
//! acts on these plans. The scheduled jobs: [`schedule`] runs prune and
//! synthetic fulls in the background, [`verify_schedule`] re-verifies
//! restore points as their policy asks, [`fleet`] keeps this node's
//! heartbeat lease and reaps the backups of nodes that lost theirs.

pub mod chains;
pub mod fleet;
pub mod retention;
pub mod schedule;
pub mod verify_schedule;
