//! A classification task: a prompt template with one `{text}` slot that ends in an answer cue, and string labels.
//! The label word of a label is the first token of `" " + label` (the word as it would follow the cue), and the
//! backbone's logits over those K tokens at the pivot are its zero-shot prediction.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

pub const TEXT_SLOT: &str = "{text}";

/// Prompts longer than this are cut in the text slot (the template's cue is kept). Enough for sentence tasks on a
/// phone; long documents should be chunked by the app.
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub template: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Task {
    spec: TaskSpec,
    label_token_ids: Vec<u32>,
    max_prompt_tokens: usize,
}

impl Task {
    pub fn new(spec: TaskSpec, tokenizer: &Tokenizer) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidTask(m));
        if spec.template.matches(TEXT_SLOT).count() != 1 {
            return bad(format!("the template must contain `{TEXT_SLOT}` exactly once: {:?}", spec.template));
        }
        if spec.labels.len() < 2 {
            return bad(format!("a task needs at least two labels, got {:?}", spec.labels));
        }
        let mut label_token_ids = Vec::with_capacity(spec.labels.len());
        for (i, label) in spec.labels.iter().enumerate() {
            if label.trim().is_empty() {
                return bad(format!("label {i} is empty"));
            }
            if spec.labels[..i].contains(label) {
                return bad(format!("label {label:?} appears twice"));
            }
            let ids = tokenizer.encode(&format!(" {label}"))?;
            let Some(&first) = ids.first() else { return bad(format!("label {label:?} encodes to no token")) };
            if let Some(j) = label_token_ids.iter().position(|&t| t == first) {
                return bad(format!(
                    "labels {:?} and {label:?} start with the same token {first} ({:?}); pick label words that differ in their first token",
                    spec.labels[j],
                    tokenizer.decode(&[first])?
                ));
            }
            label_token_ids.push(first);
        }
        Ok(Self { spec, label_token_ids, max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS })
    }

    /// Changes the prompt length limit (at least 1 token of text must fit besides the template).
    pub fn with_max_prompt_tokens(mut self, max: usize) -> Self {
        self.max_prompt_tokens = max;
        self
    }

    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    pub fn labels(&self) -> &[String] {
        &self.spec.labels
    }

    pub fn label_token_ids(&self) -> &[u32] {
        &self.label_token_ids
    }

    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.spec.labels.iter().position(|l| l == label)
    }

    /// The prompt for `text` (surrounding white space of the text is dropped: it only moves the pivot's context).
    pub fn prompt(&self, text: &str) -> String {
        self.spec.template.replacen(TEXT_SLOT, text.trim(), 1)
    }

    /// Token ids of the prompt for `text`; over `max_prompt_tokens`, the text's tokens are cut from the end so
    /// the template's answer cue, and so the pivot, stay in place.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let ids = tokenizer.encode(&self.prompt(text))?;
        if ids.len() <= self.max_prompt_tokens {
            return Ok(ids);
        }
        let (prefix, suffix) = self.spec.template.split_once(TEXT_SLOT).expect("checked in Task::new");
        let prefix = tokenizer.encode(prefix)?;
        let suffix = tokenizer.encode(suffix)?;
        let room = self.max_prompt_tokens.saturating_sub(prefix.len() + suffix.len());
        if room == 0 {
            return Err(Error::InvalidTask(format!(
                "the template alone takes {} tokens, over the limit of {}",
                prefix.len() + suffix.len(),
                self.max_prompt_tokens
            )));
        }
        let text_ids = tokenizer.encode(text.trim())?;
        Ok([prefix, text_ids[..room.min(text_ids.len())].to_vec(), suffix].concat())
    }
}
