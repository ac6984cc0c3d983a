//! The application on top of the library: the command line (`cli`: arguments and dispatch), one
//! file per command (`commands/`), the embedded demo's builder (`demo`) and the benchmarks
//! (`bench`), the C allocator's settings (`allocator`), the main thread's place in rayon's pool
//! (`threads`). Only the binary compiles these.

/// `println!` that returns an error naming stdout instead of panicking when stdout is closed or
/// its disk is full.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).context("cannot write to stdout")?
    };
}

/// `print!`, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).context("cannot write to stdout")?
    };
}

pub mod allocator;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod threads;
