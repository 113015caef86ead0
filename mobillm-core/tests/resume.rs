//! Resumable `pae` fine-tunes (`fine_tune::resume`, `fine_tune::state`) against a real assist server on
//! 127.0.0.1: a device process killed with SIGKILL mid-upload, while the server trains and between rounds, then
//! resumed in a new process; a detach and a resume in one process; the refusals.
//!
//! The device process is this test binary run again on its ignored `device_process` test, which fine-tunes (or
//! resumes) and prints every progress event on stdout; the parent kills it when the event it waits for comes.
//! What was sent twice is read from the server's own counters.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::assist::{config, examples, fixture, sessions_on_server, spec, Assist, Fixture};
use mobillm_core::dataset::Example;
use mobillm_core::fine_tune::{fine_tune, resume, CancelToken, FineTuneConfig, Outcome, Phase, StateFile};
use mobillm_core::{Backbone, Error, Mode};

/// Training examples (more than the 256 whose forward fits the whitening before anything is sent, so a kill late
/// in the forward finds part of the upload acknowledged) and held-out ones.
fn data() -> (Vec<Example>, Vec<Example>) {
    (examples(400, 0), examples(40, 1000))
}

fn resumable(url: &str, state: &Path) -> FineTuneConfig {
    FineTuneConfig {
        state: Some(StateFile::new(state)),
        max_rounds: 3,
        upload_chunk: 8,
        forward_batch: 4,
        ..config(url, Mode::Pae)
    }
}

/// The child: fine-tunes (`MOBILLM_TEST_RESUME=1`: resumes) with the state file and server given in its
/// environment, printing `event <phase> <round> <done> <total>` for every progress event and `outcome <json>` at
/// the end. Run only by the parent tests.
#[test]
#[ignore = "the device process of the kill-and-resume tests, started by them"]
fn device_process() {
    let (Ok(url), Ok(model), Ok(state)) = (
        std::env::var("MOBILLM_TEST_SERVER"),
        std::env::var("MOBILLM_TEST_MODEL"),
        std::env::var("MOBILLM_TEST_STATE"),
    ) else {
        panic!("run by the kill-and-resume tests, which set MOBILLM_TEST_SERVER, _MODEL and _STATE")
    };
    let backbone = Backbone::load(Path::new(&model)).unwrap();
    let (train, test) = data();
    let cfg = resumable(&url, Path::new(&state));
    let run = if std::env::var("MOBILLM_TEST_RESUME").as_deref() == Ok("1") { resume } else { fine_tune };
    let outcome = run(&backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |p| {
        let phase = serde_json::to_value(p.phase).unwrap();
        println!("event {} {} {} {}", phase.as_str().unwrap(), p.round, p.done, p.total);
    })
    .unwrap();
    let figures = serde_json::json!({
        "finetuned_acc": outcome.finetuned_acc,
        "upload_bytes": outcome.upload_bytes,
        "wall_s": outcome.wall_s,
        "resumes": outcome.resumes,
        "rounds_used": outcome.rounds_used,
        "refit_rounds": outcome.refit_rounds,
    });
    println!("outcome {figures}");
}

/// Where to kill the device process: the first progress event that matches.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// Three quarters of the training examples forwarded (the whitening's 256 sent, the rest on their way).
    Upload,
    /// The server training round 1.
    Training,
    /// Round 2's targets being computed and sent.
    BetweenRounds,
    /// The server training the refit's first round (the split sent, everyone's first targets too).
    Refit,
}

impl KillAt {
    fn matches(self, phase: &str, round: usize, done: usize, total: usize) -> bool {
        match self {
            KillAt::Upload => phase == "forward" && total > 0 && done * 4 >= total * 3,
            KillAt::Training => phase == "train" && round == 1,
            KillAt::BetweenRounds => phase == "targets" && round == 2,
            KillAt::Refit => phase == "refit" && round == 1 && done >= 1,
        }
    }
}

/// Runs the device process until it ends (its outcome, and the `done` of its first forward event) or `kill_at`
/// comes (`None`: killed with SIGKILL).
fn device(
    server: &Assist,
    model: &Path,
    state: &Path,
    resume: bool,
    kill_at: Option<KillAt>,
) -> Option<(Outcome2, Option<usize>)> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "device_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env("MOBILLM_TEST_SERVER", &server.url)
        .env("MOBILLM_TEST_MODEL", model)
        .env("MOBILLM_TEST_STATE", state)
        .env("MOBILLM_TEST_RESUME", if resume { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut outcome, mut first_forward) = (None, None);
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(json) = line.strip_prefix("outcome ") {
            outcome = Some(serde_json::from_str::<Outcome2>(json).unwrap());
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["event", phase, round, done, total] = fields.as_slice() {
            let n = |s: &str| s.parse::<usize>().unwrap();
            if *phase == "forward" && first_forward.is_none() {
                first_forward = Some(n(done));
            }
            if kill_at.is_some_and(|at| at.matches(phase, n(round), n(done), n(total))) {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                return None;
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the device process failed: {status}");
    Some((outcome.expect("the device process printed its outcome"), first_forward))
}

#[derive(Debug, serde::Deserialize)]
struct Outcome2 {
    finetuned_acc: f64,
    upload_bytes: u64,
    wall_s: f64,
    resumes: usize,
    rounds_used: usize,
    refit_rounds: usize,
}

fn counter(server: &Assist) -> (u64, u64) {
    (server.state.metrics.samples_stored.get(), server.state.metrics.samples_duplicate.get())
}

#[test]
fn a_killed_device_resumes_where_it_stopped_without_sending_acknowledged_samples_again() {
    let Fixture { server, dir, .. } = &fixture(21);
    let model = dir.path().join("tiny.gguf");
    let state = dir.path().join("fine-tune.state");
    let (train, _) = data();
    let started = Instant::now();
    let (whole, _) = device(server, &model, &state, false, None).unwrap();
    let whole_s = started.elapsed().as_secs_f64();
    assert!(!state.exists(), "a finished fine-tune removes its state");
    // A tenth stays on the device for validation, until the refit sends it too.
    let sent = train.len() as u64;
    assert_eq!(counter(server), (sent, 0));
    assert!(whole.refit_rounds >= 1, "{whole:?}");
    assert_eq!(sessions_on_server(server), 0);
    eprintln!("kill point | samples sent again | accuracy resumed / whole | wall s resumed / whole");
    for at in [KillAt::Upload, KillAt::Training, KillAt::BetweenRounds, KillAt::Refit] {
        let before = counter(server);
        let started = Instant::now();
        assert!(device(server, &model, &state, false, Some(at)).is_none(), "{at:?}: killed");
        assert!(state.exists(), "{at:?}: the state outlives the process");
        assert_eq!(sessions_on_server(server), 1, "{at:?}: the session waits for the resume");
        let (resumed, first_forward) = device(server, &model, &state, true, None).unwrap();
        let wall_s = started.elapsed().as_secs_f64();
        let (stored, duplicates) = (counter(server).0 - before.0, counter(server).1 - before.1);
        eprintln!(
            "{at:?} | {duplicates} | {:.3} / {:.3} | {wall_s:.1} / {whole_s:.1}",
            resumed.finetuned_acc, whole.finetuned_acc
        );
        assert_eq!(stored, sent, "{at:?}: every sample stored once");
        // A frame in flight when the process died was stored but never acknowledged to it: at most that one
        // frame goes again. After the upload, nothing does, and nothing is forwarded again.
        match at {
            KillAt::Upload => {
                assert!(duplicates <= 8, "{at:?}: {duplicates} samples sent again");
                let from = first_forward.expect("the resumed process forwards the rest");
                assert!((256..360).contains(&from), "{at:?}: resumed the forward at {from}");
            }
            _ => {
                assert_eq!(duplicates, 0, "{at:?}: samples sent again");
                assert_eq!(first_forward, None, "{at:?}: forwarded again");
            }
        }
        assert!(resumed.resumes == 1 && (2..=3).contains(&resumed.rounds_used), "{at:?}: {resumed:?}");
        assert!(resumed.upload_bytes > 0 && resumed.wall_s > 0.0);
        // Fresh secrets each run, 40 held-out examples: the resumed fine-tune learns as the whole one did.
        assert!(
            resumed.finetuned_acc >= whole.finetuned_acc - 0.15,
            "{at:?}: {} resumed against {} whole",
            resumed.finetuned_acc,
            whole.finetuned_acc
        );
        assert!(!state.exists() && sessions_on_server(server) == 0, "{at:?}: finished and cleaned up");
    }
}

#[test]
fn a_detached_fine_tune_resumes_in_the_same_process_and_cancel_ends_it() {
    let Fixture { server, backbone, dir } = &fixture(22);
    let (train, test) = data();
    let state = dir.path().join("ft.state");
    let cfg = FineTuneConfig {
        state: Some(StateFile { path: state.clone(), key: Some(vec![9; 32]) }),
        ..resumable(&server.url, &state)
    };
    // Detached as soon as the server trains: the call ends, the state and the session stay.
    let cancel = CancelToken::new();
    let detached = fine_tune(backbone, spec(), &train, &test, &cfg, &cancel, &mut |p| {
        if p.phase == Phase::Train {
            cancel.detach();
        }
    });
    match detached {
        Err(Error::Detached { path, idle_ttl_s }) => assert!(path == state && idle_ttl_s > 3600, "{idle_ttl_s}"),
        other => panic!("expected a detach, got {other:?}"),
    }
    assert!(state.exists() && sessions_on_server(server) == 1);
    assert!(!std::fs::read(&state).unwrap().windows(5).any(|w| w == b"token"), "sealed with the app's key");

    // A second fine-tune on the same file is refused: the first would be lost.
    let err = fine_tune(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput(m) if m.contains("resume it")), "{err}");
    // Another task's examples, other options or another key: refused, naming what differs; the state is intact.
    let mut other = train.clone();
    other[5].text.push('!');
    let refused = |r: Result<Outcome, Error>, what: &str| match r {
        Err(Error::CannotResume { reason, .. }) => assert!(reason.contains(what), "{what}: {reason}"),
        other => panic!("{what}: {other:?}"),
    };
    refused(resume(backbone, spec(), &other, &test, &cfg, &CancelToken::new(), &mut |_| {}), "training examples");
    let wider = FineTuneConfig { width: 32, ..cfg.clone() };
    refused(resume(backbone, spec(), &train, &test, &wider, &CancelToken::new(), &mut |_| {}), "width: 16 → 32");
    let keyless = FineTuneConfig { state: Some(StateFile::new(&state)), ..cfg.clone() };
    refused(resume(backbone, spec(), &train, &test, &keyless, &CancelToken::new(), &mut |_| {}), "encrypted");

    // Resumed: the server's job runs on, no sample is sent again, the fine-tune ends as usual.
    let before = counter(server);
    let mut phases = Vec::new();
    let o = resume(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |p| phases.push(p.phase)).unwrap();
    assert_eq!(counter(server), (before.0 + 40, before.1), "nothing sent again; the split once, for the refit");
    assert!(!phases.contains(&Phase::Forward) && !phases.contains(&Phase::Secrets), "{phases:?}");
    assert!(o.resumes == 1 && (2..=3).contains(&o.rounds_used), "{o:?}");
    assert!(o.finetuned_acc.unwrap() > o.zero_shot_acc.unwrap(), "{o:?}");
    assert!(!state.exists() && !StateFile::new(&state).tensors_path().exists());
    assert_eq!(sessions_on_server(server), 0, "the session is deleted at the end");

    // Detached, then cancelled on resume: the session and the state are gone.
    let cancel = CancelToken::new();
    let r = fine_tune(backbone, spec(), &train, &test, &cfg, &cancel, &mut |p| {
        if p.phase == Phase::Forward && p.done >= 40 {
            cancel.detach();
        }
    });
    assert!(matches!(r, Err(Error::Detached { .. })), "{r:?}");
    let cancel = CancelToken::new();
    let r = resume(backbone, spec(), &train, &test, &cfg, &cancel, &mut |p| {
        if p.phase == Phase::Forward {
            cancel.cancel();
        }
    });
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(!state.exists() && sessions_on_server(server) == 0);

    // A session the server no longer has (expired, deleted) cannot be resumed: the error says so.
    let cancel = CancelToken::new();
    let r = fine_tune(backbone, spec(), &train, &test, &cfg, &cancel, &mut |p| {
        if p.phase == Phase::Train {
            cancel.detach();
        }
    });
    assert!(matches!(r, Err(Error::Detached { .. })), "{r:?}");
    let rec = server.state.store.sessions(None, 100).unwrap().pop().unwrap();
    server.state.store.delete_session(&rec.id).unwrap();
    refused(resume(backbone, spec(), &train, &test, &cfg, &CancelToken::new(), &mut |_| {}), "no longer has session");

    // Resumable fine-tunes are `pae` ones.
    let local = FineTuneConfig { mode: Mode::Local, ..resumable(&server.url, &dir.path().join("local.state")) };
    let err = fine_tune(backbone, spec(), &train, &test, &local, &CancelToken::new(), &mut |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidInput(m) if m.contains("`pae`")), "{err}");
}
