//! Every conversion between the foreign face's types and the core's, each one `From`, so that the mapping lives
//! in one place and is tested here.

use std::sync::Arc;

use mobillm_core::fine_tune::Mode;
use mobillm_core::fine_tune::{FineTuneConfig, Outcome, Phase, Progress, StateFile};
use mobillm_core::side::Summary;
use mobillm_core::wire::Quant;

use crate::adapter::{Adapter, Prediction};
use crate::error::MobiLlmError;
use crate::fine_tune::{
    FineTuneMode, FineTuneOptions, FineTunePhase, FineTuneProgress, FineTuneResult, LayerSummary, Quantization,
};

impl From<mobillm_core::Error> for MobiLlmError {
    fn from(e: mobillm_core::Error) -> Self {
        use mobillm_core::Error as E;
        let reason = e.to_string();
        match e {
            E::Io { .. } => Self::Io { reason },
            E::InvalidModelFile { .. }
            | E::TruncatedTensor { .. }
            | E::UnsupportedTensorType { .. }
            | E::MissingTensor(_)
            | E::TensorShape { .. }
            | E::InvalidConfig(_)
            | E::UnsupportedArchitecture(_)
            | E::Tokenizer(_) => Self::InvalidModel { reason },
            E::InvalidTask(_) => Self::InvalidTask { reason },
            E::Dataset { .. } | E::InvalidInput(_) => Self::InvalidInput { reason },
            E::Server { status, code, message } => Self::Server { status, code, reason: message },
            E::TrainingFailed(message) => Self::Server { status: 500, code: "training_failed".into(), reason: message },
            E::Network(_) | E::Frame(_) | E::Protocol(_) => Self::Network { reason },
            E::Cancelled => Self::Cancelled,
            E::Detached { path, idle_ttl_s } => {
                Self::Detached { state_path: path.display().to_string(), expires_in_seconds: idle_ttl_s, reason }
            }
            E::CannotResume { .. } => Self::CannotResume { reason },
            E::Internal(_) | E::Compute(_) => Self::Internal { reason },
        }
    }
}

impl From<FineTuneMode> for Mode {
    fn from(m: FineTuneMode) -> Self {
        match m {
            FineTuneMode::Pae => Mode::Pae,
            FineTuneMode::Mobillm => Mode::Mobillm,
            FineTuneMode::Local => Mode::Local,
        }
    }
}

impl From<Quantization> for Quant {
    fn from(q: Quantization) -> Self {
        match q {
            Quantization::F16 => Quant::F16,
            Quantization::Int8 => Quant::Int8,
            Quantization::Int4 => Quant::Int4,
        }
    }
}

impl From<LayerSummary> for Summary {
    fn from(s: LayerSummary) -> Self {
        match s {
            LayerSummary::Pivot => Summary::Pivot,
            LayerSummary::PivotAndMean => Summary::PivotAndMean,
        }
    }
}

impl From<Phase> for FineTunePhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Secrets => FineTunePhase::Secrets,
            Phase::Forward => FineTunePhase::Forward,
            Phase::Train => FineTunePhase::Train,
            Phase::Targets => FineTunePhase::Targets,
            Phase::Refit => FineTunePhase::Refit,
            Phase::Evaluate => FineTunePhase::Evaluate,
            Phase::Done => FineTunePhase::Done,
        }
    }
}

impl From<&Progress> for FineTuneProgress {
    fn from(p: &Progress) -> Self {
        FineTuneProgress {
            phase: p.phase.into(),
            done: p.done as u64,
            total: p.total as u64,
            round: p.round as u32,
            loss: p.loss,
        }
    }
}

/// The options over the core's defaults for the mode: only what the app set changes them.
impl From<&FineTuneOptions> for FineTuneConfig {
    fn from(o: &FineTuneOptions) -> Self {
        let mut c = FineTuneConfig::for_mode(o.mode.map_or(Mode::Pae, Mode::from));
        c.server_url = o.server_url.clone();
        c.api_key = o.api_key.clone();
        c.ca_pem = o.ca_pem.clone().map(String::into_bytes);
        if let Some(v) = o.allow_insecure_http {
            c.insecure_http = v;
        }
        if let Some(v) = o.epochs {
            c.epochs = v as usize;
        }
        if let Some(v) = o.max_rounds {
            c.max_rounds = v as usize;
        }
        if let Some(v) = o.learning_rate {
            c.lr = v;
        }
        if let Some(v) = o.quantization {
            c.quant = v.into();
        }
        if let Some(v) = o.width {
            c.width = v as usize;
        }
        if let Some(v) = o.rank {
            c.rank = v as usize;
        }
        if let Some(v) = o.forward_batch {
            c.forward_batch = v as usize;
        }
        if let Some(v) = o.poll_millis {
            c.poll = std::time::Duration::from_millis(v.into());
        }
        c.label_epsilon = o.label_epsilon;
        if let Some(v) = o.decoys {
            c.decoys = v as usize;
        }
        if let Some(v) = o.summary {
            c.summary = v.into();
        }
        c.state = o.state_path.as_ref().map(|path| StateFile { path: path.into(), key: o.state_key.clone() });
        c
    }
}

impl From<Outcome> for FineTuneResult {
    fn from(o: Outcome) -> Self {
        FineTuneResult {
            adapter: Arc::new(Adapter { inner: o.adapter }),
            zero_shot_accuracy: o.zero_shot_acc,
            finetuned_accuracy: o.finetuned_acc,
            label_epsilon: o.label_epsilon,
            train_samples: o.train_samples as u64,
            validation_samples: o.validation_samples as u64,
            test_samples: o.test_samples as u64,
            rounds_used: o.rounds_used as u32,
            kept_round: o.kept_round as u32,
            refit_rounds: o.refit_rounds as u32,
            upload_bytes: o.upload_bytes,
            device_forward_seconds: o.device_forward_s,
            device_train_seconds: o.device_train_s,
            server_train_seconds: o.server_train_s,
            wall_seconds: o.wall_s,
            resumes: o.resumes as u32,
        }
    }
}

impl From<mobillm_core::side::Prediction> for Prediction {
    fn from(p: mobillm_core::side::Prediction) -> Self {
        Prediction { label: p.label, label_index: p.label_index as u32, scores: p.scores }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn options(mode: Option<FineTuneMode>) -> FineTuneOptions {
        FineTuneOptions {
            server_url: "https://assist.example.com".into(),
            api_key: "k".into(),
            ca_pem: None,
            allow_insecure_http: None,
            mode,
            epochs: None,
            max_rounds: None,
            learning_rate: None,
            quantization: None,
            width: None,
            rank: None,
            forward_batch: None,
            poll_millis: None,
            label_epsilon: None,
            decoys: None,
            summary: None,
            state_path: None,
            state_key: None,
        }
    }

    #[test]
    fn unset_options_take_the_cores_defaults_for_the_mode() {
        for (mode, core) in [
            (None, Mode::Pae),
            (Some(FineTuneMode::Pae), Mode::Pae),
            (Some(FineTuneMode::Mobillm), Mode::Mobillm),
            (Some(FineTuneMode::Local), Mode::Local),
        ] {
            let got = FineTuneConfig::from(&options(mode));
            let want = FineTuneConfig::for_mode(core);
            assert_eq!(
                (
                    got.mode,
                    got.epochs,
                    got.max_rounds,
                    got.lr,
                    got.width,
                    got.rank,
                    got.forward_batch,
                    got.poll,
                    got.quant
                ),
                (
                    want.mode,
                    want.epochs,
                    want.max_rounds,
                    want.lr,
                    want.width,
                    want.rank,
                    want.forward_batch,
                    want.poll,
                    want.quant
                ),
            );
            assert_eq!((got.server_url.as_str(), got.api_key.as_str()), ("https://assist.example.com", "k"));
            assert!(!got.insecure_http && got.secrets);
            assert_eq!((got.label_epsilon, got.decoys, got.summary), (None, 0, Summary::Pivot));
        }
    }

    #[test]
    fn set_options_change_exactly_their_field() {
        let o = FineTuneOptions {
            ca_pem: Some("PEM".into()),
            allow_insecure_http: Some(true),
            epochs: Some(7),
            max_rounds: Some(5),
            learning_rate: Some(0.01),
            quantization: Some(Quantization::Int4),
            width: Some(64),
            rank: Some(8),
            forward_batch: Some(4),
            poll_millis: Some(50),
            label_epsilon: Some(2.5),
            decoys: Some(3),
            summary: Some(LayerSummary::PivotAndMean),
            state_path: Some("/data/ft.state".into()),
            state_key: Some(vec![3; 32]),
            ..options(Some(FineTuneMode::Mobillm))
        };
        let c = FineTuneConfig::from(&o);
        assert_eq!(c.ca_pem.as_deref(), Some(b"PEM".as_slice()));
        assert!(c.insecure_http);
        assert_eq!((c.epochs, c.max_rounds, c.lr, c.width, c.rank, c.forward_batch), (7, 5, 0.01, 64, 8, 4));
        assert_eq!((c.quant, c.poll, c.mode), (Quant::Int4, Duration::from_millis(50), Mode::Mobillm));
        assert_eq!((c.label_epsilon, c.decoys, c.summary), (Some(2.5), 3, Summary::PivotAndMean));
        let state = c.state.as_ref().unwrap();
        assert_eq!((state.path.to_str(), state.key.as_deref()), (Some("/data/ft.state"), Some([3u8; 32].as_slice())));
        assert!(!format!("{o:?}").contains("\"k\""), "Debug hides the key");
        assert!(FineTuneConfig::from(&options(None)).state.is_none(), "no state file unless asked");
    }

    #[test]
    fn every_core_error_maps_to_one_foreign_error() {
        use mobillm_core::Error as E;
        let cases: Vec<(E, &str)> = vec![
            (E::Io { path: "/x".into(), source: std::io::Error::other("gone") }, "Io"),
            (E::InvalidModelFile { path: "/m".into(), reason: "bad".into() }, "InvalidModel"),
            (E::MissingTensor("t".into()), "InvalidModel"),
            (E::InvalidConfig("c".into()), "InvalidModel"),
            (E::Tokenizer("t".into()), "InvalidModel"),
            (E::InvalidTask("t".into()), "InvalidTask"),
            (E::Dataset { path: "/d".into(), line: 3, message: "m".into() }, "InvalidInput"),
            (E::InvalidInput("i".into()), "InvalidInput"),
            (E::Server { status: 422, code: "limit_exceeded".into(), message: "m".into() }, "Server"),
            (E::TrainingFailed("diverged".into()), "Server"),
            (E::Network("n".into()), "Network"),
            (E::Frame("f".into()), "Network"),
            (E::Protocol("p".into()), "Network"),
            (E::Cancelled, "Cancelled"),
            (E::Detached { path: "/s".into(), idle_ttl_s: 60 }, "Detached"),
            (E::CannotResume { path: "/s".into(), reason: "expired".into() }, "CannotResume"),
            (E::Internal("bug".into()), "Internal"),
        ];
        for (core, want) in cases {
            let shown = core.to_string();
            let foreign = MobiLlmError::from(core);
            let kind = format!("{foreign:?}");
            assert!(kind.starts_with(want), "{shown} became {kind}");
            if !matches!(foreign, MobiLlmError::Cancelled | MobiLlmError::Server { .. }) {
                assert_eq!(foreign.to_string(), shown, "the message is the core's");
            }
        }
        let server = MobiLlmError::from(E::Server { status: 422, code: "limit_exceeded".into(), message: "m".into() });
        assert!(matches!(server, MobiLlmError::Server { status: 422, ref code, .. } if code == "limit_exceeded"));
        let failed = MobiLlmError::from(E::TrainingFailed("diverged".into()));
        assert!(
            matches!(failed, MobiLlmError::Server { status: 500, ref code, ref reason } if code == "training_failed" && reason == "diverged")
        );
    }

    #[test]
    fn phases_and_progress_map_one_to_one() {
        let phases =
            [Phase::Secrets, Phase::Forward, Phase::Train, Phase::Targets, Phase::Refit, Phase::Evaluate, Phase::Done];
        let mapped: Vec<FineTunePhase> = phases.iter().map(|&p| p.into()).collect();
        let mut distinct = mapped.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), phases.len());
        let p = FineTuneProgress::from(&Progress::new(Phase::Train, 3, 10, 2, Some(0.5)));
        assert_eq!(p, FineTuneProgress { phase: FineTunePhase::Train, done: 3, total: 10, round: 2, loss: Some(0.5) });
    }
}
