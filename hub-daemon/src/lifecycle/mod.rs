//! Restore-point lifecycle: which restore points a retention policy keeps
//! ([`retention`]), and what removing the others means for the image chains
//! built on them ([`chains`]). Pure planning, no I/O: the prune executor
//! acts on these plans. And the one scheduled job, re-verifying restore
//! points as their policy asks ([`verify_schedule`]).

pub mod chains;
pub mod retention;
pub mod verify_schedule;
