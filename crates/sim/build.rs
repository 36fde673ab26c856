//! Declares `cfg(tokio_unstable)`: `cargo xtask sim` sets it to seed tokio's own RNG
//! (the branch order of `select!`), and plain builds go without it.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokio_unstable)");
}
