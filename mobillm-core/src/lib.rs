//! MobiLLM core: everything the device and the assist server share, with no FFI and no networking of its own.
//!
//! - [`backbone`]: the frozen, quantized Llama backbone and its pivot-token forward (design §2);
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or from a GGUF's own vocabulary;
//! - [`task`]: prompt templates and label words;
//! - [`dataset`]: JSONL and UCI data with a deterministic held-out split;
//! - [`side`]: the side network, its training objectives and the device's secrets (design §3–§5);
//! - [`wire`]: the binary frames of the `/v1` protocol (quantised activations, targets, outputs);
//! - [`protocol`]: the JSON messages of the `/v1` API and the bounds of every client-chosen size;
//! - [`client`]: the device's blocking HTTP client for the assist server;
//! - [`memory`]: peak resident memory of this process, for the benchmarks.

pub mod backbone;
pub mod client;
pub mod dataset;
pub mod error;
pub mod memory;
pub mod protocol;
pub mod session;
pub mod side;
pub mod task;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod tokenizer;
pub mod wire;

pub use backbone::{Backbone, LlamaConfig, PivotOutput};
pub use error::{Error, Result};
pub use protocol::Mode;
pub use task::{Task, TaskSpec};
pub use tokenizer::Tokenizer;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
