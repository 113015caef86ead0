//! Device and server end to end over a real socket: the real server binary on 127.0.0.1, the device's
//! `AssistClient`, and the device's secrets, targets and folding from `mobillm-core`. Pivots are synthetic here
//! (the backbone's forward is covered by the core's tests): what is tested is everything after it.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use mobillm_core::client::AssistClient;
use mobillm_core::protocol::CreateSession;
use mobillm_core::protocol::Mode;
use mobillm_core::side::targets::{accuracy, predict, prediction_differences};
use mobillm_core::side::{normalize_taps, weights_file, SampleId, Secrets, SideConfig, SideNet};
use mobillm_core::wire::Quant;
use mobillm_core::Error;

const KEY: &str = "e2e-key";
const T: usize = 4;
const D: usize = 32;
const K: usize = 2;

/// The server process and its API URL.
struct Server(std::process::Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path) -> Server {
    start_with(dir, &[])
}

fn start_with(dir: &std::path::Path, extra: &[&std::ffi::OsStr]) -> Server {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mobillm-server"))
        .args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("MOBILLM_API_KEYS", KEY)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("server address").to_string();
    Server(child, format!("http://{addr}"))
}

/// A `pae` session request with the server's defaults.
fn request(backbone: &str) -> CreateSession {
    CreateSession {
        mode: Mode::Pae,
        labels: None,
        layers: 1,
        dim: 1,
        outputs: 2,
        backbone: backbone.into(),
        width: None,
        rank: None,
        members: None,
        activation: None,
        alpha0: None,
        lr: None,
        batch_size: None,
        weight_decay: None,
        seed: None,
    }
}

/// Labels from a fixed linear teacher on the last layer; the "backbone" logits see a weak, noisy copy.
fn synthetic(seed: u64, n: usize) -> (Tensor, Tensor, Vec<u32>) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut unit = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let x: Vec<f32> = (0..n * T * D).map(|_| unit() + unit() + unit()).collect();
    let x = normalize_taps(&Tensor::from_vec(x, (n, T, D), &Device::Cpu).unwrap()).unwrap();
    let teacher: Vec<f32> = (0..K * D).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let teacher = Tensor::from_vec(teacher, (K, D), &Device::Cpu).unwrap();
    let scores = x.narrow(1, T - 1, 1).unwrap().squeeze(1).unwrap().matmul(&teacher.t().unwrap()).unwrap();
    let labels = scores.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let noise: Vec<f32> = (0..n * K).map(|_| unit() * 2.0).collect();
    let z_b = ((scores * 0.2).unwrap() + Tensor::from_vec(noise, (n, K), &Device::Cpu).unwrap()).unwrap();
    (x, z_b, labels)
}

#[test]
fn fine_tune_through_the_server_and_fold_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let client = AssistClient::new(&server.1).unwrap();

    let cfg = SideConfig { width: 32, rank: 4, ..SideConfig::new(T, D, K) };
    // Fixed secrets and ids (the server trains in id order): the run is deterministic, so the accuracy margins
    // below are facts of this data, not of a lucky draw.
    let secrets = Secrets::from_seed(&cfg, [42; 32]).unwrap();
    let (x, z_b, labels) = synthetic(1, 400);
    let (x_test, z_test, labels_test) = synthetic(2, 400);
    let req = CreateSession {
        layers: T,
        dim: D,
        outputs: cfg.outputs,
        width: Some(cfg.width),
        rank: Some(cfg.rank),
        members: Some(cfg.members),
        lr: Some(1e-2),
        batch_size: Some(32),
        seed: Some(3),
        ..request("synthetic")
    };
    let session = client.create_session(KEY, &req).unwrap();

    // The device sends rotated activations and rotated targets only.
    let ids: Vec<SampleId> = (0..400u32)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            id[4..8].copy_from_slice(&i.to_le_bytes());
            SampleId(id)
        })
        .collect();
    let rotated = secrets.rotate_activations(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let delta = prediction_differences(&z_b, None, &labels, 2.0).unwrap();
    let targets = secrets.encode_targets(&delta).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let shape = (T, D, cfg.outputs);
    // An interrupted upload (only the first half arrived) is completed by simply uploading everything again.
    let half = 200;
    client
        .upload_samples(
            &session,
            &ids[..half],
            &rotated[..half * T * D],
            &targets[..half * cfg.outputs],
            shape,
            Quant::Int8,
            64,
            |_, _| {},
        )
        .unwrap();
    let mut seen = Vec::new();
    let bytes = client
        .upload_samples(&session, &ids, &rotated, &targets, shape, Quant::Int8, 64, |done, total| {
            seen.push((done, total))
        })
        .unwrap();
    assert_eq!(seen.last(), Some(&(400, 400)));
    assert!(bytes > 0);
    assert_eq!(client.status(&session).unwrap().samples, 400, "re-uploaded ids were not duplicated");

    let base = accuracy(&predict(&z_test, None).unwrap(), &labels_test);
    let mut accs = Vec::new();
    let mut corrections: Vec<Vec<f32>> = Vec::new();
    for round in 0..2 {
        if round > 0 {
            // Refinement: the device decodes the server's outputs, recomputes Δ and sends only new targets.
            let outputs = client.outputs(&session, 400, cfg.outputs).unwrap();
            let order: std::collections::HashMap<_, _> = outputs.into_iter().collect();
            let o: Vec<f32> = ids.iter().flat_map(|id| order[id].clone()).collect();
            let o = Tensor::from_vec(o, (400, cfg.outputs), &Device::Cpu).unwrap();
            let dec = secrets.decode_outputs(&o).unwrap();
            let delta = prediction_differences(&z_b, Some(&dec), &labels, 2.0).unwrap();
            let new = (o + secrets.encode_targets(&delta).unwrap()).unwrap();
            client
                .upload_targets(&session, &ids, &new.flatten_all().unwrap().to_vec1::<f32>().unwrap(), cfg.outputs)
                .unwrap();
        }
        client.train(&session, 15).unwrap();
        let mut polls = 0;
        let done = client
            .wait_trained(&session, Duration::from_millis(20), Duration::from_secs(300), |_| {
                polls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(done.job.epochs_done, 15);
        assert!(polls >= 1);

        // The device folds the secrets into the downloaded network and predicts on plain activations.
        let tensors = client.adapter(&session).unwrap();
        let trained = SideNet::from_tensors(&cfg, &weights_file::as_refs(&tensors)).unwrap();
        let folded = secrets.fold(&trained).unwrap();
        let corr = folded.forward(&x_test).unwrap().to_dtype(DType::F32).unwrap();
        accs.push(accuracy(&predict(&z_test, Some(&corr)).unwrap(), &labels_test));
        corrections.push(corr.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert_ne!(corrections[0], corrections[1], "the second round trained further");
    eprintln!("synthetic end to end: {base} → {accs:?}");
    assert!(accs[0] > base + 0.05, "fine-tuning helps: {base} → {accs:?}");
    assert!(accs[1] >= accs[0] - 0.03, "refinement does not hurt: {accs:?}");

    // Typed errors reach the device: a wrong token, then deletion.
    let wrong = mobillm_core::client::Session { token: "nope".into(), ..session.clone() };
    match client.status(&wrong) {
        Err(mobillm_core::Error::Server { status: 401, code, .. }) => assert_eq!(code, "unauthorized"),
        other => panic!("expected 401, got {other:?}"),
    }
    client.delete(&session).unwrap();
    assert!(matches!(client.status(&session), Err(mobillm_core::Error::Server { status: 404, .. })));
    // A server that is not there is a network error after retries, not a panic.
    let gone = AssistClient::new("http://127.0.0.1:9").unwrap();
    assert!(matches!(gone.status(&session), Err(mobillm_core::Error::Network(_))));
}

/// A private CA and a certificate it signs for `localhost` and 127.0.0.1, as PEM.
fn private_ca() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[test]
fn https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let data = dir.path().join("data");
    let server =
        start_with(&data, &["--tls-cert".as_ref(), cert_path.as_os_str(), "--tls-key".as_ref(), key_path.as_os_str()]);
    let https = server.1.replace("http://", "https://");

    let client = AssistClient::with_ca(&https, ca.as_bytes()).unwrap();
    let req = CreateSession {
        layers: 1,
        dim: 4,
        outputs: 2,
        width: Some(8),
        rank: Some(2),
        members: None,
        lr: Some(1e-2),
        batch_size: Some(4),
        seed: Some(1),
        ..request("tls")
    };
    let session = client.create_session(KEY, &req).unwrap();
    let ids: Vec<SampleId> = (0..3).map(|_| SampleId::random().unwrap()).collect();
    let acts: Vec<f32> = (0..12).map(|i| i as f32 / 12.0).collect();
    client.upload_samples(&session, &ids, &acts, &[0.5; 6], (1, 4, 2), Quant::Int8, 2, |_, _| {}).unwrap();
    assert_eq!(client.status(&session).unwrap().samples, 3);

    // A client that does not trust this CA refuses the server; plain HTTP gets no answer from a TLS port.
    let (other_ca, _, _) = private_ca();
    let stranger = AssistClient::with_ca(&https, other_ca.as_bytes()).unwrap();
    assert!(matches!(stranger.status(&session), Err(Error::Network(_))));
    let plain = AssistClient::new(&server.1).unwrap();
    assert!(matches!(plain.status(&session), Err(Error::Network(_))));
    // A bad certificate path stops the server at start with a message naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mobillm-server"))
        .env("MOBILLM_API_KEYS", KEY)
        .args(["--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0", "--tls-cert", "/nonexistent.pem", "--tls-key"])
        .arg(&key_path)
        .arg("--data-dir")
        .arg(dir.path().join("data2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
