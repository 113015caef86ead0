//! An assist server run in the test's process on 127.0.0.1 (the real router and training queue, not a stand-in),
//! a tiny generated backbone, and a two-label task whose label is carried by its words: what the fine-tune's
//! tests share.

use std::sync::Arc;
use std::time::Duration;

use mobillm_core::dataset::Example;
use mobillm_core::fine_tune::FineTuneConfig;
use mobillm_core::{Backbone, Mode, TaskSpec};
use mobillm_server::{AppState, ServerConfig};

pub const KEY: &str = "fine-tune-key";

/// An assist server on a loopback port, stopped when dropped.
pub struct Assist {
    pub url: String,
    pub state: Arc<AppState>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Assist {
    fn drop(&mut self) {
        self.state.shutdown(Duration::from_secs(10));
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

pub fn start(data_dir: &std::path::Path) -> Assist {
    // The test writes kilobytes; the production watermark (1 GiB free) would fail it on a nearly full CI disk.
    let config = ServerConfig { min_free_disk_mb: 16, ..ServerConfig::new(data_dir, vec![KEY.into()]) };
    let state = mobillm_server::open(config).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = mobillm_server::app(state.clone());
    runtime.spawn(async move { axum::serve(listener, app).await });
    Assist { url, state, runtime: Some(runtime) }
}

/// A tiny generated backbone and an assist server, with the model and the server's data in a temporary directory.
/// Fields drop in order: the server stops before the directory goes.
pub struct Fixture {
    pub server: Assist,
    pub backbone: Backbone,
    pub dir: tempfile::TempDir,
}

pub fn fixture(seed: u64) -> Fixture {
    let (backbone, dir) = tiny_backbone(seed);
    let server = start(&dir.path().join("data"));
    Fixture { server, backbone, dir }
}

pub fn tiny_backbone(seed: u64) -> (Backbone, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    mobillm_core::testkit::write_tiny_gguf(seed, &model);
    (Backbone::load(&model).unwrap(), dir)
}

pub fn spec() -> TaskSpec {
    TaskSpec { template: "Text: {text}\nIs it pos or neg:".into(), labels: vec!["pos".into(), "neg".into()] }
}

/// Texts whose label is carried by their words: "pos" examples mention "the pos", "neg" ones do not.
pub fn examples(n: usize, offset: usize) -> Vec<Example> {
    (offset..offset + n)
        .map(|i| {
            if i % 2 == 0 {
                Example { text: format!("the pos {i} at it"), label: "pos".into() }
            } else {
                Example { text: format!("on s{i} re as"), label: "neg".into() }
            }
        })
        .collect()
}

pub fn config(url: &str, mode: Mode) -> FineTuneConfig {
    FineTuneConfig {
        server_url: url.to_string(),
        api_key: KEY.into(),
        mode,
        width: 16,
        rank: 4,
        lr: 1e-2,
        batch_size: 8,
        epochs: if mode == Mode::Mobillm { 12 } else { 15 },
        max_rounds: 2,
        forward_batch: 8,
        upload_chunk: 10,
        poll: std::time::Duration::from_millis(20),
        ..FineTuneConfig::default()
    }
}

pub fn sessions_on_server(server: &Assist) -> usize {
    server.state.store.sessions(None, 100).unwrap().len()
}
