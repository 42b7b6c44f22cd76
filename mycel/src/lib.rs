//! `mycel`'s parts, as a library: the binary (`main.rs`) is built from them, and the fuzz target
//! renders what it parses through them.

pub mod check;
pub mod output;
pub mod policies;
pub mod stat;
pub mod status;
pub mod table;
