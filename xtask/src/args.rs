//! Command-line options shared by the commands that run the backbone.

use std::path::PathBuf;

/// Model and data options shared by the commands that run the backbone.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DataArgs {
    /// A GGUF file or a safetensors directory (default: the fetched SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL data, one {"text","label"} object per line (default: the UCI sentences).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Prompt template with one {text} slot, ending in an answer cue (default: the UCI sentiment prompt).
    #[arg(long)]
    pub template: Option<String>,
}
