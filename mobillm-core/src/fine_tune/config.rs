//! What a fine-tune needs besides the backbone, the task and the data. [`FineTuneConfig::for_mode`] is the one
//! source of defaults: the FFI's options and the CLI's flags start from it and change only what the caller gave.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol;
use crate::side::{SideConfig, Summary, TrainConfig};
use crate::wire::Quant;

/// Where the side network trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// PAE MobiLLM (the default): pivots sent once with device-defined targets, secrets; the server trains.
    #[default]
    Pae,
    /// MobiLLM: every token's activations each pass, labels on the server (for comparison).
    Mobillm,
    /// No server: the device keeps its pivots (int8) and trains the side network itself, with labels
    /// (`fine_tune::local`). Nothing leaves the device.
    Local,
}

impl Mode {
    /// The server session's mode; `None` for `local`, which opens none.
    pub fn remote(self) -> Option<protocol::Mode> {
        match self {
            Mode::Pae => Some(protocol::Mode::Pae),
            Mode::Mobillm => Some(protocol::Mode::Mobillm),
            Mode::Local => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.remote() {
            Some(m) => m.fmt(f),
            None => f.write_str("local"),
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pae" => Ok(Mode::Pae),
            "mobillm" => Ok(Mode::Mobillm),
            "local" => Ok(Mode::Local),
            other => Err(Error::InvalidInput(format!("unknown mode {other:?} (pae, mobillm or local)"))),
        }
    }
}

/// `Debug` never prints the API key. `local` mode reads none of the server's fields.
#[derive(Clone)]
pub struct FineTuneConfig {
    pub server_url: String,
    pub api_key: String,
    /// Trust only this CA (PEM) for HTTPS; `None` uses the platform's trust store.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow plain `http://` to a host that is not loopback (development only: an emulator reaching its host).
    pub insecure_http: bool,
    pub mode: Mode,
    /// Tapped blocks; `None` taps them all.
    pub taps: Option<Vec<usize>>,
    /// `pae` and `local`: what is kept of each tapped block (the pivot by default; with the mean too, twice the
    /// upload or the device's buffer).
    pub summary: Summary,
    /// Side-network width w and bottleneck rank r of each of `members` networks trained side by side (their mean
    /// corrects the backbone).
    pub width: usize,
    pub rank: usize,
    pub members: usize,
    pub lr: f64,
    /// Largest server mini-batch (`pae`): a small data set gets `n/8` (at least 16), so every epoch takes at least
    /// 8 optimiser steps (measured: 256 examples reach 93% after one round at 32, 78.5% at 128); `local` likewise
    /// on the device. In `mobillm` mode a step is one forward batch.
    pub batch_size: usize,
    pub seed: u64,
    /// `pae`: server epochs per round; `local`: the device's. `mobillm`: passes over the data, each a new device
    /// forward.
    pub epochs: usize,
    /// `pae` and `local`: at most this many rounds; fewer when the validation split stops improving
    /// (`fine_tune::stopping`).
    pub max_rounds: usize,
    /// τ, the scale of the prediction differences (docs/design.md §4).
    pub tau: f64,
    pub quant: Quant,
    /// Examples per device forward.
    pub forward_batch: usize,
    /// Samples per `pae` upload frame.
    pub upload_chunk: usize,
    /// `pae` only: rotate with secret matrices (on by default; off only to measure what they protect).
    pub secrets: bool,
    /// Label differential privacy: train on labels passed through randomized response at this ε
    /// (`side::label_noise`); `None` trains on the true labels. Smaller is more private and less accurate.
    pub label_epsilon: Option<f64>,
    /// `pae` with secrets: synthetic tasks sent beside the real one, mixed with it through `Q`, so the targets
    /// hold `decoys + 1` partitions of the samples (`side::decoys`). 0 sends none.
    pub decoys: usize,
    /// Keep the server session after the fine-tune (for inspection); by default it is deleted.
    pub keep_server_session: bool,
    /// `pae`: record every acknowledged step in this file, so that `fine_tune::resume` continues the fine-tune
    /// after a kill or a detach (`fine_tune::state`); `None` runs it in one go.
    pub state: Option<super::StateFile>,
    /// How often to ask the server about training progress.
    pub poll: Duration,
    /// How long one round of server training (queue included) may take before the fine-tune gives up.
    pub max_train_wait: Duration,
}

impl FineTuneConfig {
    /// The measured defaults of `mode` (docs/side-network.md) against a server on `http://127.0.0.1:8787`.
    /// `mobillm` mode takes smaller steps (lr 10⁻³, one per forward batch) and 3 passes over the data; `local`
    /// runs at most 4 rounds (the phone pays for each).
    pub fn for_mode(mode: Mode) -> Self {
        let side = SideConfig::new(1, 1, 2);
        let train = TrainConfig::default();
        let (epochs, lr) = match mode {
            Mode::Pae | Mode::Local => (train.epochs, train.lr),
            Mode::Mobillm => (3, 1e-3),
        };
        Self {
            server_url: "http://127.0.0.1:8787".into(),
            api_key: String::new(),
            ca_pem: None,
            insecure_http: false,
            mode,
            taps: None,
            summary: Summary::Pivot,
            width: side.width,
            rank: side.rank,
            members: side.members,
            lr,
            batch_size: train.batch_size,
            seed: train.seed,
            epochs,
            // Local rounds run on the phone: 4 bound its training to about half its forward's time on UCI (each
            // round ≈ 15–25 s for 2160 examples on 2 cores); rounds past the first added 0–0.5 points there.
            max_rounds: if mode == Mode::Local { 4 } else { 8 },
            tau: crate::side::targets::DEFAULT_TAU,
            quant: Quant::Int8,
            forward_batch: 16,
            upload_chunk: 64,
            secrets: true,
            label_epsilon: None,
            decoys: 0,
            keep_server_session: false,
            state: None,
            poll: Duration::from_millis(250),
            max_train_wait: Duration::from_secs(3600),
        }
    }

    /// The mini-batch when `samples` examples are trained on by epochs (`pae` on the server, `local`):
    /// [`FineTuneConfig::batch_size`], smaller for small data sets.
    pub fn epoch_batch(&self, samples: usize) -> usize {
        self.batch_size.min((samples / 8).max(16))
    }

    /// The counts a fine-tune loops over must be positive.
    pub fn validate(&self) -> Result<()> {
        let zero = [
            ("forward_batch", self.forward_batch),
            ("upload_chunk", self.upload_chunk),
            ("epochs", self.epochs),
            ("max_rounds", if self.mode == Mode::Mobillm { 1 } else { self.max_rounds }),
            ("batch_size", self.batch_size),
        ]
        .into_iter()
        .find(|(_, v)| *v == 0);
        if let Some((name, _)) = zero {
            return Err(Error::InvalidInput(format!("{name} must be positive")));
        }
        if self.decoys > crate::side::decoys::MAX_DECOYS {
            return Err(Error::InvalidInput(format!(
                "at most {} decoys, not {}",
                crate::side::decoys::MAX_DECOYS,
                self.decoys
            )));
        }
        if self.mode == Mode::Mobillm && !self.summary.is_pivot() {
            return Err(Error::InvalidInput(
                "the summary is a `pae` option: `mobillm` mode sends every token of every tapped layer".into(),
            ));
        }
        if self.decoys > 0 && (self.mode != Mode::Pae || !self.secrets) {
            return Err(Error::InvalidInput(
                "decoys need `pae` mode with the secrets on: without Q the server reads which outputs are real".into(),
            ));
        }
        if let Some(key) = self.state.as_ref().and_then(|s| s.key.as_ref()) {
            // Checked before any server session exists, not when the first record is sealed.
            crate::sealed::check_key(key, "a state file's key")?;
        }
        if self.mode == Mode::Local && self.label_epsilon.is_some() {
            return Err(Error::InvalidInput(
                "label noise hides labels from the server: `local` mode sends nothing, so it has none to hide".into(),
            ));
        }
        self.label_epsilon.map_or(Ok(()), crate::side::label_noise::validate_epsilon)
    }
}

impl Default for FineTuneConfig {
    fn default() -> Self {
        Self::for_mode(Mode::Pae)
    }
}

impl std::fmt::Debug for FineTuneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FineTuneConfig")
            .field("server_url", &self.server_url)
            .field("api_key", &"<redacted>")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("insecure_http", &self.insecure_http)
            .field("mode", &self.mode)
            .field("taps", &self.taps)
            .field("summary", &self.summary)
            .field("width", &self.width)
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("lr", &self.lr)
            .field("batch_size", &self.batch_size)
            .field("seed", &self.seed)
            .field("epochs", &self.epochs)
            .field("max_rounds", &self.max_rounds)
            .field("tau", &self.tau)
            .field("quant", &self.quant)
            .field("forward_batch", &self.forward_batch)
            .field("upload_chunk", &self.upload_chunk)
            .field("secrets", &self.secrets)
            .field("label_epsilon", &self.label_epsilon)
            .field("decoys", &self.decoys)
            .field("keep_server_session", &self.keep_server_session)
            .field("state", &self.state)
            .field("poll", &self.poll)
            .field("max_train_wait", &self.max_train_wait)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_has_its_defaults_from_one_place() {
        let pae = FineTuneConfig::for_mode(Mode::Pae);
        let mobillm = FineTuneConfig::for_mode(Mode::Mobillm);
        assert_eq!((pae.epochs, pae.lr, pae.max_rounds), (10, 3e-3, 8));
        assert_eq!((mobillm.epochs, mobillm.lr), (3, 1e-3));
        assert_eq!(FineTuneConfig::for_mode(Mode::Local).max_rounds, 4);
        assert_eq!((pae.width, pae.rank, pae.members), (32, 16, 4), "the side network's own defaults");
        assert_eq!(pae.batch_size, TrainConfig::default().batch_size);
        assert_eq!(FineTuneConfig::default().mode, Mode::Pae);
        pae.validate().unwrap();
        let bad = FineTuneConfig { upload_chunk: 0, ..pae.clone() };
        assert!(matches!(bad.validate(), Err(Error::InvalidInput(m)) if m.contains("upload_chunk")));
        let short_key = super::super::StateFile { path: "ft.state".into(), key: Some(vec![1; 16]) };
        let bad = FineTuneConfig { state: Some(short_key), ..pae };
        assert!(matches!(bad.validate(), Err(Error::InvalidInput(m)) if m.contains("32 bytes, not 16")), "{bad:?}");
    }

    #[test]
    fn debug_never_prints_the_api_key() {
        let cfg = FineTuneConfig { api_key: "very-secret-key".into(), ..Default::default() };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("very-secret-key") && shown.contains("<redacted>"), "{shown}");
    }
}
