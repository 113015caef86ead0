//! The side network (docs/design.md §3), its training objectives (§4) and the device's secrets (§5), shared by the
//! server's trainer and the device's fusion; the device's whitening (`whitening`) and label noise (`label_noise`,
//! label differential privacy); `int8_rows`, the pivots a `local` fine-tune keeps to train on.

pub mod adamw;
pub mod adapter;
pub mod config;
pub mod decoys;
pub mod int8_rows;
pub mod label_noise;
pub mod network;
pub mod sample;
pub mod secrets;
pub mod targets;
pub mod trainer;
pub mod weights_file;
pub mod whitening;

pub use adapter::{device_inputs, DeviceAdapter, Prediction};
pub use config::{Activation, Optimizer, SideConfig, Summary, TrainConfig};
pub use network::{normalize_taps, SideNet};
pub use sample::{CachedSample, SampleId};
pub use secrets::Secrets;
pub use trainer::{EpochReport, Objective, SideTrainer};
pub use whitening::Whitening;
