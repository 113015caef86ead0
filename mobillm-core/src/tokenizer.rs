//! Tokenizers through the `tokenizers` crate: loaded from a `tokenizer.json`, or rebuilt from the vocabulary and
//! merges a GGUF file carries, so that one `.gguf` is all a device needs.
//!
//! Rebuilding from GGUF supports byte-level BPE (`tokenizer.ggml.model = "gpt2"`) with the pre-tokenizers of
//! `tokenizer.ggml.pre`: `smollm` (every digit its own piece, then GPT-2 byte-level splitting) and `gpt2`/`default`
//! (GPT-2 byte-level splitting). Tokens of type 3 (control, e.g. `<|im_start|>`) become special added tokens.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// GGUF token type of control tokens (llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: i32 = 3;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| md.get(k).ok_or_else(|| Error::Tokenizer(format!("GGUF has no `{k}`")));
        // Borrow the metadata's strings instead of copying the arrays: the vocabulary is ~50k entries, and every
        // transient copy shows up in the device's peak memory.
        let string_array = |k: &str| -> Result<Vec<&str>> {
            get(k)?
                .to_vec()
                .map_err(|_| Error::Tokenizer(format!("`{k}` is not an array")))?
                .iter()
                .map(|v| {
                    v.to_string().map(String::as_str).map_err(|_| Error::Tokenizer(format!("`{k}` holds a non-string")))
                })
                .collect()
        };
        let model = get("tokenizer.ggml.model")?.to_string().map_err(|_| Error::Tokenizer("bad model".into()))?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model `{model}` is not supported (supported: gpt2 byte-level BPE)"
            )));
        }
        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map_or("default", |s| s.as_str());
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        let pre_tokenizer = match pre {
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ])),
            "gpt2" | "default" => byte_level,
            other => {
                return Err(Error::Tokenizer(format!(
                    "pre-tokenizer `{other}` is not supported (supported: smollm, gpt2); load a tokenizer.json instead"
                )))
            }
        };

        let tokens = string_array("tokenizer.ggml.tokens")?;
        let merges = string_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("merge `{m}` is not two space-separated tokens")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| Error::Tokenizer("`tokenizer.ggml.token_type` is not an array".into()))?
                .iter()
                .map(|t| t.to_i32().map_err(|_| Error::Tokenizer("token type is not an i32".into())))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!("{} token types for {} tokens", types.len(), tokens.len())));
        }
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        if vocab.len() != tokens.len() {
            return Err(Error::Tokenizer("the GGUF vocabulary has duplicate tokens".into()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot build BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(Self { inner })
    }

    /// Token ids of `text`, with no BOS/EOS added (SmolLM2 adds none; prompts carry their own cues).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes the tokenizer as a `tokenizer.json` (what the GGUF implied, for inspection or for other tools).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, true).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }
}
