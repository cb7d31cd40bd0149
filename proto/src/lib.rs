//! Wire types and pure helpers shared by every floe component.
//!
//! Nothing in this crate does I/O. It holds the contracts that components
//! meet through (see `DESIGN.md`): REST bodies and error shapes, the TURN
//! REST credential format, join tokens, and usage records.

pub mod api;
pub mod credential;
pub mod error;
pub mod id;
pub mod signal;
pub mod time;
pub mod token;
pub mod usage;

pub use error::ErrorBody;
