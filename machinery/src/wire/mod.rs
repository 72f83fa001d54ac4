//! Go machinery's wire format: the task message ([`signature`]), typed arguments and results with Go's
//! type tags ([`args`]), task states and group records ([`state`]), Go's time format ([`gotime`]), and
//! the tolerant reading that Go's `encoding/json` does (keys in any case, `null` as zero values, unknown
//! keys ignored).
//!
//! This room sits below everything else: it imports nothing of the crate outside itself, so every
//! transport and the engine can build on it.

mod arg;
pub mod args;
pub mod gotime;
pub mod signature;
pub mod state;
pub(crate) mod tolerant;
