//! A `pae` fine-tune's record on the device, so that it outlives the process (docs/design.md §7).
//!
//! The contract:
//! - The record is written after every acknowledged step — an upload frame the server stored, a round's training
//!   asked for, a round folded and scored — each time atomically (a temporary file, fsync, rename, fsync of the
//!   directory): a kill at any instant leaves the last complete record. It is sealed with the app's key when one
//!   is given (`sealed`).
//! - It holds what continuing needs and nothing of the data: the server session and its token, the secret seed,
//!   the label noise's seed, which training examples are held back and which are acknowledged, their random ids
//!   and the backbone's label logits for them (K numbers each, the only per-example values), the round reached and
//!   the validation rule's state, and fingerprints of the backbone, the training examples and the options that
//!   shape the fine-tune. No text, no activation.
//! - Beside it, `<path>.tensors` holds the session's whitening (fitted once, on the device) and the network of the
//!   best round so far, folded: the secrets an adapter would hold. It is written before the record that relies on
//!   it, so a kill between the two leaves a tensors file one step ahead, which replaying that step rewrites.
//! - Resuming checks everything recorded against what it is given and refuses with [`Error::CannotResume`],
//!   naming what differs, rather than continue a different fine-tune.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::FineTuneConfig;
use super::stopping::Stopping;
use super::RoundReport;
use crate::client::Session;
use crate::dataset::Example;
use crate::error::{Error, Result};
use crate::side::{weights_file, SampleId, SideConfig, SideNet, Whitening};
use crate::task::TaskSpec;

/// The record's format; a record of another is refused (2: the refit's step and the split's ids).
const FORMAT: u32 = 2;
/// The tensors file's metadata key for the round of the network it holds.
const KEPT_ROUND: &str = "kept_round";

/// Where a fine-tune's record goes, and the key (32 bytes, from the app's keystore) that seals it. `Debug` never
/// prints the key.
#[derive(Clone)]
pub struct StateFile {
    pub path: PathBuf,
    pub key: Option<Vec<u8>>,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile").field("path", &self.path).field("sealed", &self.key.is_some()).finish()
    }
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), key: None }
    }

    /// The tensors file beside the record.
    pub fn tensors_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".tensors");
        PathBuf::from(name)
    }

    /// Whether a record is there (a fine-tune to resume).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Deletes the record and its tensors file (either may be missing).
    pub fn remove(&self) -> Result<()> {
        for path in [self.path.clone(), self.tensors_path()] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(path, e)),
                _ => {}
            }
        }
        Ok(())
    }

    fn cannot(&self, reason: impl Into<String>) -> Error {
        Error::CannotResume { path: self.path.clone(), reason: reason.into() }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        match &self.key {
            Some(key) => crate::sealed::write_atomically(path, &crate::sealed::seal(key, bytes)?),
            None => crate::sealed::write_atomically(path, bytes),
        }
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => self.cannot(format!("{} does not exist", path.display())),
            _ => Error::io(path, e),
        })?;
        match (&self.key, crate::sealed::is_sealed(&bytes)) {
            (Some(key), _) => crate::sealed::open(key, &bytes, path).map_err(|e| match e {
                Error::InvalidModelFile { reason, .. } => self.cannot(format!("{}: {reason}", path.display())),
                e => e,
            }),
            (None, true) => Err(self.cannot("the record is encrypted: give the key it was written with")),
            (None, false) => Ok(bytes),
        }
    }
}

/// The options that shape a fine-tune: a resume must give the same ones (the server's address, the key, polling
/// and batch sizes of the device's own work may change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    mode: String,
    server_url: String,
    taps: Option<Vec<usize>>,
    summary: crate::side::Summary,
    width: usize,
    rank: usize,
    /// Absent from files written before networks had members: one.
    #[serde(default = "crate::side::config::one")]
    members: usize,
    lr: f64,
    batch_size: usize,
    seed: u64,
    epochs: usize,
    max_rounds: usize,
    tau: f64,
    quant: crate::wire::Quant,
    secrets: bool,
    label_epsilon: Option<f64>,
    decoys: usize,
}

impl Recipe {
    pub fn of(cfg: &FineTuneConfig) -> Self {
        Self {
            mode: cfg.mode.to_string(),
            server_url: cfg.server_url.clone(),
            taps: cfg.taps.clone(),
            summary: cfg.summary,
            width: cfg.width,
            rank: cfg.rank,
            members: cfg.members,
            lr: cfg.lr,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            epochs: cfg.epochs,
            max_rounds: cfg.max_rounds,
            tau: cfg.tau,
            quant: cfg.quant,
            secrets: cfg.secrets,
            label_epsilon: cfg.label_epsilon,
            decoys: cfg.decoys,
        }
    }

    /// The options that differ from `recorded`, as `name: recorded → given`.
    fn differences(&self, recorded: &Recipe) -> Vec<String> {
        let fields = |r: &Recipe| -> BTreeMap<String, serde_json::Value> {
            serde_json::from_value(serde_json::to_value(r).unwrap_or_default()).unwrap_or_default()
        };
        let (given, was) = (fields(self), fields(recorded));
        was.iter()
            .filter(|(name, value)| given.get(*name) != Some(value))
            .map(|(name, value)| format!("{name}: {value} → {}", given.get(name).cloned().unwrap_or_default()))
            .collect()
    }
}

/// The server session a record continues.
#[derive(Clone, Serialize, Deserialize)]
pub struct ServerSession {
    pub session_id: String,
    pub token: String,
    pub max_samples: usize,
    pub idle_ttl_s: u64,
}

impl From<&Session> for ServerSession {
    fn from(s: &Session) -> Self {
        Self {
            session_id: s.session_id.clone(),
            token: s.token.clone(),
            max_samples: s.max_samples,
            idle_ttl_s: s.idle_ttl_s,
        }
    }
}

impl From<&ServerSession> for Session {
    fn from(s: &ServerSession) -> Self {
        Self {
            session_id: s.session_id.clone(),
            token: s.token.clone(),
            max_samples: s.max_samples,
            idle_ttl_s: s.idle_ttl_s,
        }
    }
}

/// Where a fine-tune stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Forwarding and uploading the training examples.
    Upload,
    /// Round `round`: its new targets still to send (rounds after the first) until `train_key` is set; then its
    /// training asked for with that idempotency key (asking again with it never starts a second job).
    Round { round: usize, train_key: Option<String> },
    /// The refit's round `round` (`stopping`), after the rule's `after` rounds: the same, its first round also
    /// sending the validation split.
    Refit { after: usize, round: usize, train_key: Option<String> },
}

/// What is written (see the module documentation).
#[derive(Clone, Serialize, Deserialize)]
pub struct Record {
    format: u32,
    /// SHA-256 of the backbone and of the task and training examples.
    backbone: String,
    data: String,
    recipe: Recipe,
    pub server: ServerSession,
    pub secret_seed: Option<[u8; 32]>,
    /// The label noise's seed (label differential privacy): the same noisy labels after a resume.
    pub noise_seed: Option<[u8; 32]>,
    /// The training examples held back on the device (indices into the training examples).
    pub validation: Vec<usize>,
    /// One random id per sent example, in order, and per held-back example (sent for the refit).
    pub ids: Vec<SampleId>,
    pub validation_ids: Vec<SampleId>,
    /// Per sent example: acknowledged by the server, and its label logits `z_b` (K values, as f32 bits; zeros
    /// until acknowledged).
    pub acked: Vec<bool>,
    z_b: Vec<u32>,
    /// The whitening is fitted and in the tensors file.
    pub whitened: bool,
    pub step: Step,
    pub stopping: Stopping,
    pub reports: Vec<RoundReport>,
    pub upload_bytes: u64,
    pub device_forward_s: f64,
    pub server_train_s: f64,
    /// Wall seconds of the processes before this one.
    pub wall_s: f64,
    /// Times this fine-tune was resumed.
    pub resumes: usize,
}

/// What identifies a fine-tune's inputs: SHA-256 of the task and every training example, in order.
pub fn data_fingerprint(spec: &TaskSpec, train: &[Example]) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(&spec.template);
    spec.labels.iter().for_each(|l| field(l));
    for e in train {
        field(&e.text);
        field(&e.label);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The record of a running fine-tune, in memory and (with a [`StateFile`]) on disk.
pub struct Journal {
    file: Option<StateFile>,
    pub record: Record,
    /// Labels per example (the width of a `z_b` row).
    labels: usize,
}

/// What a new fine-tune records before its first upload.
pub struct Start<'a> {
    pub backbone: &'a str,
    pub data: String,
    pub cfg: &'a FineTuneConfig,
    pub session: &'a Session,
    pub secret_seed: Option<[u8; 32]>,
    pub noise_seed: Option<[u8; 32]>,
    pub validation: Vec<usize>,
    pub sent: usize,
    pub labels: usize,
}

impl Journal {
    /// A new fine-tune's record, written at once when there is a file.
    pub fn start(file: Option<StateFile>, s: Start) -> Result<Self> {
        let validation_ids = s.validation.iter().map(|_| SampleId::random()).collect::<Result<_>>()?;
        let record = Record {
            format: FORMAT,
            backbone: s.backbone.to_string(),
            data: s.data,
            recipe: Recipe::of(s.cfg),
            server: ServerSession::from(s.session),
            secret_seed: s.secret_seed,
            noise_seed: s.noise_seed,
            validation: s.validation,
            ids: (0..s.sent).map(|_| SampleId::random()).collect::<Result<_>>()?,
            validation_ids,
            acked: vec![false; s.sent],
            z_b: vec![0; s.sent * s.labels],
            whitened: false,
            step: Step::Upload,
            stopping: Stopping::default(),
            reports: Vec::new(),
            upload_bytes: 0,
            device_forward_s: 0.0,
            server_train_s: 0.0,
            wall_s: 0.0,
            resumes: 0,
        };
        let journal = Self { file, record, labels: s.labels };
        journal.save()?;
        Ok(journal)
    }

    /// Reads the record in `file` and checks it against the backbone, the data and the options given.
    pub fn resume(file: StateFile, backbone: &str, data: &str, cfg: &FineTuneConfig, labels: usize) -> Result<Self> {
        let bytes = file.read(&file.path)?;
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| file.cannot(format!("unreadable: {e}")))?;
        if record.format != FORMAT {
            return Err(file.cannot(format!("record format {} (this SDK reads {FORMAT})", record.format)));
        }
        if record.backbone != backbone {
            return Err(file.cannot("the backbone is not the one the fine-tune started with"));
        }
        if record.data != data {
            return Err(file.cannot("the task or the training examples changed since the fine-tune started"));
        }
        let changed = Recipe::of(cfg).differences(&record.recipe);
        if !changed.is_empty() {
            return Err(file.cannot(format!("the options differ from the recorded ones ({})", changed.join(", "))));
        }
        let n = record.ids.len();
        if record.acked.len() != n
            || record.z_b.len() != n * labels
            || record.validation_ids.len() != record.validation.len()
        {
            return Err(file.cannot("the record is inconsistent (its per-example lists differ in length)"));
        }
        let all_acked = record.acked.iter().all(|&a| a);
        if record.step != Step::Upload && !all_acked {
            return Err(file.cannot("the record is inconsistent (rounds began before every example was stored)"));
        }
        let mut journal = Self { file: Some(file), record, labels };
        journal.record.resumes += 1;
        journal.save()?;
        Ok(journal)
    }

    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// Writes the record (nothing without a file).
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let bytes = serde_json::to_vec(&self.record).map_err(|e| Error::Internal(format!("state record: {e}")))?;
        file.write(&file.path, &bytes)
    }

    /// The backbone's label logits of the sent examples, `[n·K]` (zeros where not yet acknowledged).
    pub fn z_b(&self) -> Vec<f32> {
        self.record.z_b.iter().map(|&b| f32::from_bits(b)).collect()
    }

    /// Records sent examples `samples` (with their label logits, K each) as acknowledged, and the device's time
    /// and bytes so far; then writes the record.
    pub fn acknowledge(&mut self, samples: &[usize], logits: &[f32], bytes: u64, forward_s: f64) -> Result<()> {
        let k = self.labels;
        for (j, &i) in samples.iter().enumerate() {
            self.record.acked[i] = true;
            for (dst, src) in self.record.z_b[i * k..(i + 1) * k].iter_mut().zip(&logits[j * k..(j + 1) * k]) {
                *dst = src.to_bits();
            }
        }
        self.record.upload_bytes += bytes;
        self.record.device_forward_s = forward_s;
        self.save()
    }

    /// Writes the tensors file: the whitening and, once a round is kept, its folded network.
    pub fn save_tensors(&self, whitening: Option<&Whitening>, kept: Option<(usize, &SideNet)>) -> Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let mut tensors: Vec<(&str, candle_core::Tensor)> = whitening.map(Whitening::tensors).unwrap_or_default();
        let mut meta = HashMap::new();
        if let Some((round, net)) = kept {
            tensors.extend(net.tensors());
            meta.insert(KEPT_ROUND.to_string(), round.to_string());
        }
        file.write(&file.tensors_path(), &weights_file::to_bytes(&tensors, meta)?)
    }

    /// Reads the tensors file: the whitening (when the record says it is fitted) and the kept network, if it is
    /// the round the record keeps (a file one round ahead is rewritten when that round is replayed).
    pub fn load_tensors(&self, side: &SideConfig) -> Result<(Option<Whitening>, Option<SideNet>)> {
        let (Some(file), true) = (&self.file, self.record.whitened || self.record.stopping.best_round().is_some())
        else {
            return Ok((None, None));
        };
        let path = file.tensors_path();
        let (tensors, meta) = weights_file::from_bytes(&file.read(&path)?)
            .map_err(|e| file.cannot(format!("{}: {e}", path.display())))?;
        let tensors = weights_file::as_refs(&tensors);
        let damaged = |e: Error| file.cannot(format!("{}: {e}", path.display()));
        let whitening = match self.record.whitened {
            true => Some(
                Whitening::from_tensors(&tensors, side.taps, side.hidden)
                    .map_err(damaged)?
                    .ok_or_else(|| file.cannot(format!("{} holds no whitening", path.display())))?,
            ),
            false => None,
        };
        let kept_round = meta.get(KEPT_ROUND).and_then(|r| r.parse::<usize>().ok());
        let kept = match self.record.stopping.best_round() {
            Some(best) if kept_round == Some(best) => Some(SideNet::from_tensors(side, &tensors).map_err(damaged)?),
            Some(best) if kept_round != Some(best + 1) => {
                return Err(file.cannot(format!("{} does not hold round {best}'s network", path.display())))
            }
            _ => None,
        };
        Ok((whitening, kept))
    }

    /// Ends the record: the fine-tune finished or was cancelled.
    pub fn remove(&self) -> Result<()> {
        self.file.as_ref().map_or(Ok(()), StateFile::remove)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session { session_id: "s1".into(), token: "t".into(), max_samples: 100, idle_ttl_s: 3600 }
    }

    fn start(file: Option<StateFile>, cfg: &FineTuneConfig) -> Journal {
        Journal::start(
            file,
            Start {
                backbone: "bb",
                data: "data".into(),
                cfg,
                session: &session(),
                secret_seed: Some([7; 32]),
                noise_seed: None,
                validation: vec![0, 3],
                sent: 4,
                labels: 2,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_record_survives_a_round_trip_and_refuses_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile { path: dir.path().join("ft.state"), key: Some(vec![5; 32]) };
        let cfg = FineTuneConfig::default();
        let mut journal = start(Some(file.clone()), &cfg);
        journal.acknowledge(&[1, 2], &[0.5, -1.25, 2.0, 3.0], 100, 1.5).unwrap();
        let back = Journal::resume(file.clone(), "bb", "data", &cfg, 2).unwrap();
        assert_eq!(back.record.acked, vec![false, true, true, false]);
        assert_eq!(back.z_b(), vec![0.0, 0.0, 0.5, -1.25, 2.0, 3.0, 0.0, 0.0]);
        assert_eq!((back.record.upload_bytes, back.record.resumes), (100, 1));
        assert_eq!(back.record.ids, journal.record.ids);
        assert_eq!(back.record.secret_seed, Some([7; 32]));
        let raw = std::fs::read(&file.path).unwrap();
        assert!(!raw.windows(2).any(|w| w == b"s1"), "sealed: the session id does not show");

        let refused = |r: Result<Journal>, what: &str| match r {
            Err(Error::CannotResume { reason, .. }) => assert!(reason.contains(what), "{reason}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("resumed despite {what}"),
        };
        refused(Journal::resume(file.clone(), "other", "data", &cfg, 2), "backbone");
        refused(Journal::resume(file.clone(), "bb", "changed", &cfg, 2), "training examples");
        let wider = FineTuneConfig { width: 64, epochs: 3, ..cfg.clone() };
        refused(Journal::resume(file.clone(), "bb", "data", &wider, 2), "epochs: 10 → 3, width: 32 → 64");
        refused(Journal::resume(StateFile { key: None, ..file.clone() }, "bb", "data", &cfg, 2), "encrypted");
        refused(Journal::resume(StateFile { key: Some(vec![6; 32]), ..file.clone() }, "bb", "data", &cfg, 2), "key");
        std::fs::write(&file.path, &raw[..raw.len() / 2]).unwrap();
        refused(Journal::resume(file.clone(), "bb", "data", &cfg, 2), "the file was changed");
        file.remove().unwrap();
        refused(Journal::resume(file.clone(), "bb", "data", &cfg, 2), "does not exist");
        file.remove().unwrap();
    }

    #[test]
    fn the_tensors_file_gives_the_kept_round_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("ft.state"));
        let cfg = FineTuneConfig::default();
        let mut journal = start(Some(file.clone()), &cfg);
        let side = SideConfig { width: 8, rank: 2, ..SideConfig::new(3, 16, 2) };
        let net =
            SideNet::from_tensors(&side, &crate::side::SideTrainer::new(&side, &Default::default()).unwrap().tensors())
                .unwrap();
        assert!(journal.load_tensors(&side).unwrap().1.is_none(), "nothing kept yet, nothing read");
        journal
            .record
            .stopping
            .improved(1, super::super::stopping::Score { accuracy: 0.8, loss: 0.4, correct: vec![] });
        journal.save_tensors(None, Some((2, &net))).unwrap();
        assert!(journal.load_tensors(&side).unwrap().1.is_none(), "round 2 is ahead of the record: replayed");
        journal.save_tensors(None, Some((1, &net))).unwrap();
        assert!(journal.load_tensors(&side).unwrap().1.is_some());
        journal.save_tensors(None, Some((5, &net))).unwrap();
        assert!(matches!(journal.load_tensors(&side), Err(Error::CannotResume { .. })));
        journal.remove().unwrap();
        assert!(!file.path.exists() && !file.tensors_path().exists());
    }
}
