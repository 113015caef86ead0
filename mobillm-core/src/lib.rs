//! MobiLLM core: the model math and the device's side of the protocol, shared by the device (through
//! `mobillm-ffi` and the `mobillm-device` CLI) and the assist server. No FFI here; the only networking is the
//! device's client. The design is docs/design.md; how the crates fit, docs/architecture.md.
//!
//! The device's backbone:
//! - [`backbone`]: the frozen, quantized Llama backbone, its pivot-token forward and how prompts are batched
//!   (docs/design.md §2);
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or from a GGUF's own vocabulary;
//! - [`task`]: prompt templates and label words; [`dataset`]: JSONL and UCI data with a deterministic split.
//!
//! The side network, on both ends:
//! - [`side`]: the side network, its training, the prediction-difference targets, the device's secrets and the
//!   device adapter file (docs/design.md §3–§5);
//! - [`sealed`]: authenticated encryption of files at rest with an app-supplied key.
//!
//! The protocol and the fine-tune:
//! - [`protocol`]: the JSON messages of the `/v1` API and the bounds of every client-chosen size;
//! - [`wire`]: the binary frames of the `/v1` API (quantised activations, targets, outputs);
//! - [`client`]: the device's blocking HTTP client for the assist server;
//! - [`fine_tune`]: a whole fine-tune on the device, in `pae`, `mobillm` or `local` mode.
//!
//! Support: [`error`] (the one error type), [`memory`] (peak resident memory, for the benchmarks), and
//! `testkit` (feature `testkit`: tiny generated models and the fuzz targets' bodies).

pub mod backbone;
pub mod client;
pub mod dataset;
pub mod error;
pub mod fine_tune;
pub mod memory;
pub mod protocol;
pub mod sealed;
pub mod side;
pub mod task;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tokenizer;
pub mod wire;

pub use backbone::{Backbone, LlamaConfig, PivotOutput};
pub use error::{Error, Result};
pub use fine_tune::Mode;
pub use task::{Task, TaskSpec};
pub use tokenizer::Tokenizer;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
