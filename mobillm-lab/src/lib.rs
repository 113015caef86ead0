//! MobiLLM's research and benchmarks, kept out of the product crates and out of `xtask` (not published).
//! `cargo xtask <command>` runs the `mobillm-lab` binary for each of these.
//!
//! - [`audit`]: the privacy audit, which plays a curious server against real fine-tunes; [`frontier`]: the label
//!   defences' accuracy against the best label attack;
//! - [`side_eval`], [`zeroshot`]: accuracy of the side network and of the frozen backbone on real pivots;
//! - [`bench`], [`bench_forward`], [`lora`]: MobiLLM against on-device LoRA, and the forward pass's speed and memory;
//! - [`load`]: many simulated devices against one server; [`cluster`]: the server as a cluster on real
//!   components, with processes killed mid-run, and its scaling;
//! - [`inputs`]: what the harnesses share.

pub mod audit;
pub mod bench;
pub mod bench_forward;
pub mod cluster;
pub mod frontier;
pub mod inputs;
pub mod load;
pub mod lora;
pub mod side_eval;
pub mod zeroshot;
