//! Restore-point lifecycle: which restore points a retention policy keeps
//! ([`retention`]), and what removing the others means for the image chains
//! built on them ([`chains`]). Pure planning, no I/O: the prune executor
//! acts on these plans.

pub mod chains;
pub mod retention;
