//! `mycel`'s parts, as a library: the binary (`main.rs`) is built from them, and the tests read
//! expositions with [`exposition`].

pub mod check;
pub mod exposition;
pub mod output;
pub mod policies;
pub mod prometheus;
pub mod stat;
pub mod status;
pub mod table;
