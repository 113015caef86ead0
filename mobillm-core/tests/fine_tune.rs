//! The fine-tune (`mobillm_core::fine_tune`) end to end on a tiny generated backbone, against a real assist
//! server run in this process on 127.0.0.1 (the server crate is a dev-dependency: the test drives the real
//! router and training queue, not a stand-in).

mod common;

use std::sync::{Arc, Mutex};

use common::assist::{config, examples, fixture, sessions_on_server, spec, tiny_backbone, Fixture};
use mobillm_core::dataset::Example;
use mobillm_core::fine_tune::{fine_tune, CancelToken, FineTuneConfig, Outcome, Phase, Progress};
use mobillm_core::side::{DeviceAdapter, Prediction, SideNet, Summary};
use mobillm_core::{Backbone, Error, Mode};

/// Mean probability of the true label.
fn p_true(predictions: &[Prediction], examples: &[Example]) -> f32 {
    let labels = ["pos", "neg"];
    let sum: f32 = predictions
        .iter()
        .zip(examples)
        .map(|(p, e)| p.scores[labels.iter().position(|l| *l == e.label).unwrap()])
        .sum();
    sum / examples.len() as f32
}

/// `adapter` with every weight zero: it predicts what the backbone alone does.
fn zeroed(adapter: &DeviceAdapter) -> DeviceAdapter {
    let zeros: Vec<_> = adapter.net.tensors().into_iter().map(|(n, t)| (n, t.zeros_like().unwrap())).collect();
    DeviceAdapter { net: SideNet::from_tensors(adapter.side_config(), &zeros).unwrap(), ..adapter.clone() }
}

fn run(backbone: &Backbone, url: &str, mode: Mode, train: &[Example], test: &[Example]) -> (Outcome, Vec<Progress>) {
    let mut seen = Vec::new();
    let outcome =
        fine_tune(backbone, spec(), train, test, &config(url, mode), &CancelToken::new(), &mut |p| seen.push(*p))
            .unwrap();
    (outcome, seen)
}

#[test]
fn fine_tunes_a_tiny_backbone_in_both_modes() {
    let Fixture { server, backbone, dir } = &fixture(11);
    let (train, test) = (examples(40, 0), examples(12, 100));

    // With no adapter: the backbone's own probabilities (a fresh adapter changes nothing).
    let texts: Vec<&str> = train.iter().map(|e| e.text.as_str()).collect();
    let (pae, progress) = run(backbone, &server.url, Mode::Pae, &train, &test);
    let zero = zeroed(&pae.adapter);
    let before = p_true(&zero.predict(backbone, &texts).unwrap(), &train);
    let after = p_true(&pae.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after > before + 0.05, "pae moves predictions towards the labels: {before} → {after}");
    assert!(pae.adapter.secret_seed.is_some());
    assert!(pae.adapter.whitening.is_some(), "a session with secrets whitens");
    assert_eq!((pae.train_samples, pae.test_samples), (40, 12));
    assert!(pae.zero_shot_acc.is_some() && pae.finetuned_acc.is_some());
    // Phases in order; training reported both rounds to the end.
    let phases: Vec<Phase> = progress.iter().map(|p| p.phase).collect();
    let first = |ph: Phase| phases.iter().position(|p| *p == ph).unwrap();
    assert!(first(Phase::Secrets) < first(Phase::Forward) && first(Phase::Forward) < first(Phase::Train));
    assert_eq!(phases.last(), Some(&Phase::Done));
    assert!(progress.iter().any(|p| p.phase == Phase::Train && p.round == 2 && p.done == 15 && p.total == 15));
    assert!(progress.iter().any(|p| p.phase == Phase::Forward && p.done == 40 && p.total == 40));

    let (mobillm, _) = run(backbone, &server.url, Mode::Mobillm, &train, &test);
    let after_mobillm = p_true(&mobillm.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after_mobillm > before + 0.05, "mobillm moves predictions too: {before} → {after_mobillm}");
    assert!(mobillm.adapter.secret_seed.is_none() && mobillm.adapter.whitening.is_none());
    // Every token of every tapped layer, every epoch, against pivots once plus a round of targets.
    assert!(
        mobillm.upload_bytes > 10 * pae.upload_bytes,
        "mobillm {} vs pae {} bytes",
        mobillm.upload_bytes,
        pae.upload_bytes
    );

    // With label noise the fine-tune reports its ε (a large ε flips almost nothing, so it still learns).
    let noisy_cfg = FineTuneConfig { label_epsilon: Some(8.0), ..config(&server.url, Mode::Pae) };
    let noisy = fine_tune(backbone, spec(), &train, &test, &noisy_cfg, &CancelToken::new(), &mut |_| {}).unwrap();
    assert_eq!((pae.label_epsilon, noisy.label_epsilon), (None, Some(8.0)));
    let after_noisy = p_true(&noisy.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after_noisy > before + 0.05, "pae with label noise still learns: {before} → {after_noisy}");

    // Every server session were deleted when their fine-tunes ended.
    assert_eq!(sessions_on_server(server), 0);

    // With decoys the first round's targets span one direction per task (Δ sums to zero over 2 labels), not one
    // in all, in the same 8 outputs; the device still learns the real task from what comes back.
    let first_targets = |decoys: usize| {
        let cfg = FineTuneConfig { decoys, max_rounds: 1, keep_server_session: true, ..config(&server.url, Mode::Pae) };
        fine_tune(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |_| {}).unwrap();
        let rec = server.state.store.sessions(None, 100).unwrap().pop().unwrap();
        let set = server.state.store.training_set(&rec).unwrap();
        server.state.store.delete_session(&rec.id).unwrap();
        let sv = nalgebra::DMatrix::from_row_slice(set.ids.len(), rec.shape.outputs, &set.targets).singular_values();
        (sv.iter().filter(|&&v| v > 1e-3 * sv.max()).count(), rec.shape.outputs)
    };
    // Up to 4 with three decoys: on this fixture the backbone's word preferences mostly follow the real labels,
    // so fewer than three candidates may be distinct from them, and a copy adds no direction.
    let (plain, decoyed) = (first_targets(0), first_targets(3));
    assert_eq!(plain, (1, 8), "(target rank, outputs)");
    assert!(decoyed.1 == 8 && (2..=4).contains(&decoyed.0), "(target rank, outputs) {decoyed:?}");
    let decoy_cfg = FineTuneConfig { decoys: 3, ..config(&server.url, Mode::Pae) };
    let decoyed = fine_tune(backbone, spec(), &train, &test, &decoy_cfg, &CancelToken::new(), &mut |_| {}).unwrap();
    let after_decoys = p_true(&decoyed.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after_decoys > before + 0.05, "pae with decoys still learns: {before} → {after_decoys}");

    // The adapter file round-trips and predicts the same.
    let file = dir.path().join("adapter.safetensors");
    pae.adapter.save(&file).unwrap();
    let loaded = mobillm_core::side::DeviceAdapter::load(&file).unwrap();
    assert_eq!(loaded.predict(backbone, &texts).unwrap(), pae.adapter.predict(backbone, &texts).unwrap());
    // Prediction runs a forward batch at a time (40 texts of a few lengths: 3 batches, sorted by length); each
    // text's prediction is the one it gets alone.
    let batched = pae.adapter.predict(backbone, &texts).unwrap();
    for (text, p) in texts.iter().zip(&batched) {
        let alone = &pae.adapter.predict(backbone, &[text]).unwrap()[0];
        assert_eq!(alone.label_index, p.label_index, "{text}");
        assert!(alone.scores.iter().zip(&p.scores).all(|(a, b)| (a - b).abs() < 1e-4), "{text}: {alone:?} vs {p:?}");
    }

    // Pivots and means: two inputs per tapped layer on the server, about twice the upload, and an adapter that
    // builds the same inputs when it predicts, from its file too.
    let both_cfg =
        FineTuneConfig { summary: Summary::PivotAndMean, keep_server_session: true, ..config(&server.url, Mode::Pae) };
    let both = fine_tune(backbone, spec(), &train, &test, &both_cfg, &CancelToken::new(), &mut |_| {}).unwrap();
    let rec = server.state.store.sessions(None, 100).unwrap().pop().unwrap();
    server.state.store.delete_session(&rec.id).unwrap();
    let layers = pae.adapter.taps.len();
    assert_eq!((rec.shape.layers, both.adapter.taps.len()), (2 * layers, layers));
    let ratio = both.upload_bytes as f64 / pae.upload_bytes as f64;
    assert!((1.5..2.5).contains(&ratio), "upload {} against {} bytes", both.upload_bytes, pae.upload_bytes);
    let after_both = p_true(&both.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after_both > before + 0.05, "pae on pivots and means learns: {before} → {after_both}");
    both.adapter.save(&file).unwrap();
    let loaded = mobillm_core::side::DeviceAdapter::load(&file).unwrap();
    assert_eq!(loaded.side_config().summary, Summary::PivotAndMean);
    assert_eq!(loaded.predict(backbone, &texts).unwrap(), both.adapter.predict(backbone, &texts).unwrap());
}

#[test]
fn pae_holds_back_a_validation_split_and_keeps_the_last_round_that_improved_on_it() {
    let Fixture { server, backbone, .. } = &fixture(13);
    let (train, test) = (examples(220, 0), examples(12, 1000));
    let cfg = FineTuneConfig { max_rounds: 4, keep_server_session: true, ..config(&server.url, Mode::Pae) };
    let o = fine_tune(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |_| {}).unwrap();
    assert_eq!((o.train_samples, o.validation_samples), (220, 22), "a tenth stays on the device");
    let rec = server.state.store.sessions(None, 100).unwrap().pop().unwrap();
    assert_eq!(server.state.store.training_set(&rec).unwrap().ids.len(), 220, "the refit sent the split too");
    server.state.store.delete_session(&rec.id).unwrap();

    assert!((1..=4).contains(&o.rounds_used), "{o:?}");
    if o.rounds_used < 4 {
        assert_eq!(o.kept_round, o.rounds_used - 1, "it stops at the first round that did not improve");
    }
    // One report per round, then the refit's: as many rounds as were kept, not scored on the split it trains on.
    assert_eq!(o.refit_rounds, o.kept_round);
    assert_eq!(o.rounds.len(), o.rounds_used + o.refit_rounds, "{:?}", o.rounds);
    let (rule, refit) = o.rounds.split_at(o.rounds_used);
    assert!(rule.iter().all(|r| r.validation_acc.is_some()), "every round was scored on the split");
    assert!(refit.iter().all(|r| r.validation_acc.is_none()), "{refit:?}");
    // The adapter is the refit's last network.
    assert_eq!(o.finetuned_acc, o.rounds.last().map(|r| r.finetuned_acc));

    // Steps too small to move the validation loss by 15%: the second round is no improvement, so the fine-tune
    // stops there and keeps the first.
    let stalled = FineTuneConfig { lr: 1e-9, keep_server_session: false, ..cfg.clone() };
    let s = fine_tune(backbone, spec(), &train, &test, &stalled, &CancelToken::new(), &mut |_| {}).unwrap();
    assert_eq!((s.rounds_used, s.kept_round, s.refit_rounds), (2, 1, 1), "{:?}", s.rounds);

    // Too few examples for a split: all are sent and the fixed 3 rounds run, not the 4 allowed.
    let small = fine_tune(backbone, spec(), &train[..40], &test, &cfg, &CancelToken::new(), &mut |_| {}).unwrap();
    assert_eq!((small.validation_samples, small.rounds_used, small.kept_round, small.refit_rounds), (0, 3, 3, 0));
    assert!(small.rounds.iter().all(|r| r.validation_acc.is_none()));
}

#[test]
fn cancelling_mid_training_stops_and_deletes_the_server_session() {
    let Fixture { server, backbone, .. } = &fixture(12);
    let (train, test) = (examples(40, 0), examples(8, 100));
    let cancel = CancelToken::new();
    let cfg = FineTuneConfig { epochs: 1000, ..config(&server.url, Mode::Pae) };
    let phases = Arc::new(Mutex::new(Vec::new()));
    let result = fine_tune(backbone, spec(), &train, &test, &cfg, &cancel, &mut |p| {
        phases.lock().unwrap().push(p.phase);
        if p.phase == Phase::Train && p.done >= 1 {
            cancel.cancel();
        }
    });
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert!(phases.lock().unwrap().contains(&Phase::Train));
    assert_eq!(sessions_on_server(server), 0, "the cancelled session is gone");

    // Bad input is refused before anything is sent.
    let mut bad = train.clone();
    bad[3].label = "maybe".into();
    let err = fine_tune(backbone, spec(), &bad, &test, &cfg, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput(m) if m.contains("maybe")), "{err}");
    let bad_epsilon = FineTuneConfig { label_epsilon: Some(0.0), ..cfg.clone() };
    let err = fine_tune(backbone, spec(), &train, &test, &bad_epsilon, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput(m) if m.contains("ε")), "{err}");
    for (bad_decoys, why) in [
        (FineTuneConfig { decoys: 8, ..cfg.clone() }, "at most 7"),
        (FineTuneConfig { decoys: 1, secrets: false, ..cfg.clone() }, "secrets"),
        (FineTuneConfig { decoys: 1, ..config(&server.url, Mode::Mobillm) }, "pae"),
        (FineTuneConfig { summary: Summary::PivotAndMean, ..config(&server.url, Mode::Mobillm) }, "`pae` option"),
    ] {
        let err =
            fine_tune(backbone, spec(), &train, &test, &bad_decoys, &CancelToken::new(), &mut |_| {}).unwrap_err();
        assert!(matches!(&err, Error::InvalidInput(m) if m.contains(why)), "{why}: {err}");
    }
    let wrong_key = FineTuneConfig { api_key: "nope".into(), ..cfg.clone() };
    let err = fine_tune(backbone, spec(), &train, &test, &wrong_key, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::Server { status: 401, .. }), "{err}");
}

#[test]
fn local_mode_trains_on_the_device_with_no_server_at_all() {
    let (backbone, dir) = &tiny_backbone(14);
    let (train, test) = (examples(220, 0), examples(12, 1000));
    let texts: Vec<&str> = train.iter().map(|e| e.text.as_str()).collect();
    // Nothing listens on the discard port and there is no key: a local fine-tune must not need either.
    let cfg = FineTuneConfig {
        server_url: "http://127.0.0.1:9".into(),
        api_key: String::new(),
        max_rounds: 4,
        ..config("", Mode::Local)
    };
    let mut seen = Vec::new();
    let o = fine_tune(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |p| seen.push(*p)).unwrap();
    assert_eq!((o.mode, o.upload_bytes, o.server_train_s), (Mode::Local, 0, 0.0));
    assert!(o.device_train_s > 0.0 && o.device_forward_s > 0.0, "{o:?}");
    assert!(o.adapter.secret_seed.is_none() && o.adapter.whitening.is_none(), "nothing to hide from anyone");
    assert_eq!(o.adapter.net.out_rows(), 2, "one output per label: no padding to hide K");

    // It learns: the fused model's probability of the true label rises well above the backbone's.
    let zero = zeroed(&o.adapter);
    let before = p_true(&zero.predict(backbone, &texts).unwrap(), &train);
    let after = p_true(&o.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after > before + 0.05, "local training moves predictions towards the labels: {before} → {after}");

    // Rounds as in `pae`: a validation split on the device, one report per round, the kept round's network.
    assert_eq!((o.train_samples, o.validation_samples), (220, 22));
    assert!((1..=4).contains(&o.rounds_used) && o.rounds.len() == o.rounds_used, "{o:?}");
    assert_eq!(o.finetuned_acc, Some(o.rounds[o.kept_round - 1].finetuned_acc));
    // Progress: the forward, the held-out forwards, the device's epochs of every round; no secrets or targets.
    let phases: Vec<Phase> = seen.iter().map(|p| p.phase).collect();
    assert!(!phases.contains(&Phase::Secrets) && !phases.contains(&Phase::Targets), "{phases:?}");
    assert!(seen.iter().any(|p| p.phase == Phase::Forward && p.done == 198 && p.total == 198));
    assert!(seen.iter().any(|p| p.phase == Phase::Train && p.round == 1 && p.done == 15 && p.loss.is_some()));
    assert_eq!(phases.last(), Some(&Phase::Done));

    // The adapter file round-trips and predicts the same.
    let file = dir.path().join("local.safetensors");
    o.adapter.save(&file).unwrap();
    let loaded = mobillm_core::side::DeviceAdapter::load(&file).unwrap();
    assert_eq!(loaded.predict(backbone, &texts).unwrap(), o.adapter.predict(backbone, &texts).unwrap());

    // Pivots and means are kept on the device just as well.
    let both = FineTuneConfig { summary: Summary::PivotAndMean, max_rounds: 1, ..cfg.clone() };
    let b = fine_tune(backbone, spec(), &train[..40], &test, &both, &CancelToken::new(), &mut |_| {}).unwrap();
    assert_eq!(b.adapter.side_config().taps, 2 * b.adapter.taps.len());
    let after_both = p_true(&b.adapter.predict(backbone, &texts).unwrap(), &train);
    assert!(after_both > before + 0.05, "local on pivots and means learns: {before} → {after_both}");

    // Cancelled during the device's training: stops within an epoch.
    let cancel = CancelToken::new();
    let long = FineTuneConfig { epochs: 1000, ..cfg.clone() };
    let result = fine_tune(backbone, spec(), &train[..40], &test, &long, &cancel, &mut |p| {
        if p.phase == Phase::Train && p.done >= 2 {
            cancel.cancel();
        }
    });
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");

    // What only means something with a server is refused by name.
    for (bad, why) in [
        (FineTuneConfig { label_epsilon: Some(1.0), ..cfg.clone() }, "`local` mode sends nothing"),
        (FineTuneConfig { decoys: 1, ..cfg.clone() }, "decoys need `pae`"),
    ] {
        let err = fine_tune(backbone, spec(), &train, &test, &bad, &CancelToken::new(), &mut |_| {}).unwrap_err();
        assert!(matches!(&err, Error::InvalidInput(m) if m.contains(why)), "{why}: {err}");
    }
}
