//! The application on top of the library: the command line (`cli`), the embedded demo's builder
//! (`demo`) and the benchmarks (`bench`). Only the binary compiles these.

pub mod bench;
pub mod cli;
pub mod demo;
