//! Labelled text: JSONL files of `{"text": …, "label": …}` and the UCI Sentiment Labelled Sentences, with a
//! deterministic held-out split.
//!
//! The split orders examples by the SHA-256 of their text and holds out the first ones, so it depends on nothing
//! but the data (no RNG whose algorithm could change between crate versions) and is the same on every machine.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: String,
}

#[derive(Debug, Clone, Default)]
pub struct Split {
    pub train: Vec<Example>,
    pub test: Vec<Example>,
}

/// The three sources of the UCI set, as files in npm `sentiment@5.0.2` (`package/test/fixtures/<name>.json`).
pub const UCI_SOURCES: [&str; 3] = ["amazon", "imdb", "yelp"];
/// Held out per UCI source (of 1000 sentences each).
pub const UCI_HELD_OUT_PER_SOURCE: usize = 200;
/// The UCI labels: class 0 and class 1.
pub const UCI_LABELS: [&str; 2] = ["negative", "positive"];
/// The prompt the UCI task uses: SmolLM2-Instruct's own chat format, the answer cue opening the assistant's turn.
/// Zero-shot it is worse than a plain `Review: …\nSentiment (positive or negative):` (49.8% against 67.7%), but
/// the side network trains on its pivots to about 1.3 points more (docs/side-network.md, *The prompt*).
pub const UCI_TEMPLATE: &str =
    "<|im_start|>user\nIs the following review positive or negative?\n{text}<|im_end|>\n<|im_start|>assistant\nThe review is";

/// Reads JSONL, one example per non-blank line. Errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(&line).map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            line: i + 1,
            message: format!("expected {{\"text\": string, \"label\": string}}: {e}"),
        })?;
        if ex.text.trim().is_empty() {
            return Err(Error::Dataset { path: path.to_path_buf(), line: i + 1, message: "empty text".into() });
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::Dataset { path: path.to_path_buf(), line: 0, message: "no examples".into() });
    }
    Ok(out)
}

/// The distinct labels of `examples` in order of first appearance.
pub fn labels_of(examples: &[Example]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for ex in examples {
        if !labels.contains(&ex.label) {
            labels.push(ex.label.clone());
        }
    }
    labels
}

/// Holds out `n_test` examples chosen by text hash; the rest, in their original order, is the training set.
pub fn split_held_out(examples: Vec<Example>, n_test: usize) -> Split {
    let mut order: Vec<(usize, [u8; 32])> =
        examples.iter().enumerate().map(|(i, ex)| (i, Sha256::digest(ex.text.as_bytes()).into())).collect();
    order.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut is_test = vec![false; examples.len()];
    for &(i, _) in order.iter().take(n_test) {
        is_test[i] = true;
    }
    let mut split = Split::default();
    for (ex, test) in examples.into_iter().zip(is_test) {
        if test {
            split.test.push(ex)
        } else {
            split.train.push(ex)
        }
    }
    split
}

/// A JSONL data set split 80/20 (at least one test example).
pub fn split_jsonl(path: &Path) -> Result<Split> {
    let examples = read_jsonl(path)?;
    let n_test = (examples.len() / 5).max(1).min(examples.len().saturating_sub(1));
    Ok(split_held_out(examples, n_test))
}

/// Reads one UCI source file (`[{"text", "class": 0|1}, …]`, whose last record is an empty placeholder).
pub fn read_uci_source(path: &Path) -> Result<Vec<Example>> {
    #[derive(Deserialize)]
    struct Record {
        text: String,
        class: Option<u8>,
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let records: Vec<Record> = serde_json::from_slice(&bytes).map_err(|e| Error::Dataset {
        path: path.to_path_buf(),
        line: 0,
        message: format!("expected a JSON array of {{\"text\", \"class\"}}: {e}"),
    })?;
    let mut out = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        match r.class {
            None if r.text.trim().is_empty() => continue,
            Some(c @ (0 | 1)) => {
                out.push(Example { text: r.text.trim().to_string(), label: UCI_LABELS[c as usize].into() })
            }
            other => {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!("record {i}: class {other:?} is not 0 or 1"),
                })
            }
        }
    }
    Ok(out)
}

/// The UCI set from the directory holding `amazon.json`, `imdb.json`, `yelp.json`: 200 sentences of each source
/// held out, the other 2400 for training.
pub fn uci_split(dir: &Path) -> Result<Split> {
    let mut split = Split::default();
    for source in UCI_SOURCES {
        let path: PathBuf = dir.join(format!("{source}.json"));
        let s = split_held_out(read_uci_source(&path)?, UCI_HELD_OUT_PER_SOURCE);
        split.train.extend(s.train);
        split.test.extend(s.test);
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> Example {
        Example { text: text.into(), label: label.into() }
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let data: Vec<Example> =
            (0..50).map(|i| ex(&format!("sentence {i}"), if i % 2 == 0 { "a" } else { "b" })).collect();
        let s1 = split_held_out(data.clone(), 10);
        let s2 = split_held_out(data.iter().rev().cloned().collect(), 10);
        assert_eq!(s1.test.len(), 10);
        assert_eq!(s1.train.len(), 40);
        let mut t1: Vec<_> = s1.test.iter().map(|e| e.text.clone()).collect();
        let mut t2: Vec<_> = s2.test.iter().map(|e| e.text.clone()).collect();
        t1.sort();
        t2.sort();
        assert_eq!(t1, t2, "the held-out set depends on the texts, not their order");
        assert!(s1.train.iter().all(|e| !t1.contains(&e.text)));
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\":\"ok\",\"label\":\"x\"}\n\n{\"text\":\"no label\"}\n").unwrap();
        let err = read_jsonl(&p).unwrap_err();
        assert!(matches!(err, Error::Dataset { line: 3, .. }), "{err}");
        std::fs::write(&p, "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"y\"}\n").unwrap();
        let data = read_jsonl(&p).unwrap();
        assert_eq!(labels_of(&data), vec!["x", "y"]);
        let split = split_jsonl(&p).unwrap();
        assert_eq!((split.train.len(), split.test.len()), (1, 1));
    }

    #[test]
    fn uci_records_drop_the_placeholder_and_map_classes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("amazon.json");
        std::fs::write(&p, r#"[{"text":"Great.  ","class":1},{"text":"Bad.","class":0},{"text":"","class":null}]"#)
            .unwrap();
        let data = read_uci_source(&p).unwrap();
        assert_eq!(data, vec![ex("Great.", "positive"), ex("Bad.", "negative")]);
        std::fs::write(&p, r#"[{"text":"Odd.","class":7}]"#).unwrap();
        assert!(matches!(read_uci_source(&p), Err(Error::Dataset { .. })));
    }
}
