//! The binary frames of the `/v1` protocol (docs/design.md §6). A frame is a 20-byte plain prefix followed by a zstd
//! stream of the body:
//!
//! ```text
//! prefix:  magic "MBLF" | version u16 | kind u8 | quant u8 | reserved u32 (0) | decoded body length u64
//! body:    n u32 | layers u32 | dim u32 | width u32 | seq_total u32      (counts and dimensions)
//!          ids        n × 16 bytes
//!          [Sequences only] lens n × u32, labels n × u32
//!          activations per vector (a sample's layer, or a token's layer): quantised `dim` values
//!          values      n × width f32 (targets, outputs or prior logits)
//! ```
//!
//! All integers little-endian. The decoder checks the prefix and the declared length against the caller's
//! [`Limits`] before it allocates, decompresses with a hard cap (a body longer than declared, a zstd bomb, is
//! refused without being inflated), then checks every count and dimension against the declared length and the
//! limits, and refuses non-finite scales and values.

mod body;
mod quant;

use half::f16;

use crate::error::{Error, Result};
use crate::side::SampleId;
use body::decode_as;
pub use body::Element;
use quant::quantize_into;
pub use quant::{Quant, INT4_GROUP};

pub const MAGIC: [u8; 4] = *b"MBLF";
pub const VERSION: u16 = 1;
const PREFIX_LEN: usize = 20;
const COUNTS_LEN: usize = 20;
/// zstd level for frames: fast on a phone, and activations do not compress much further at higher levels.
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// PAE upload: per sample one vector per tapped layer, plus its target row.
    Samples = 1,
    /// New targets for samples already uploaded (refinement rounds).
    Targets = 2,
    /// Per-sample side outputs (server → device).
    Outputs = 3,
    /// MobiLLM mode: every token's vector per tapped layer, a label and the backbone's label logits per sample.
    Sequences = 4,
}

impl FrameKind {
    fn from_code(c: u8) -> Option<Self> {
        [FrameKind::Samples, FrameKind::Targets, FrameKind::Outputs, FrameKind::Sequences]
            .into_iter()
            .find(|k| *k as u8 == c)
    }
}

/// What a frame carries. Activations decode to f32 ([`Frame::decode`]) or, for a store that keeps them as f16,
/// straight to f16 ([`Frame::decode_f16`]) without an f32 copy in between.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<A = f32> {
    pub kind: FrameKind,
    pub ids: Vec<SampleId>,
    /// Tapped layers per vector group (0 for frames without activations).
    pub layers: usize,
    pub dim: usize,
    /// Row-major: sample (and token, for sequences), then layer, then `dim` values.
    pub activations: Vec<A>,
    /// Tokens per sample (sequences only).
    pub lens: Vec<u32>,
    /// Labels (sequences only).
    pub labels: Vec<u32>,
    /// Values per sample: targets, outputs or prior logits.
    pub width: usize,
    pub values: Vec<f32>,
}

/// Bounds a decoder enforces; the server derives them from its configuration and the session's dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_decoded_bytes: usize,
    /// Largest ratio of decoded body to compressed bytes. Real activations hardly compress (about 1.1:1 at int8),
    /// so a frame that inflates far more is padding or an amplification attempt.
    pub max_expansion: usize,
    pub max_samples: usize,
    pub max_layers: usize,
    pub max_dim: usize,
    pub max_width: usize,
    pub max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_decoded_bytes: 64 << 20,
            max_expansion: usize::MAX,
            max_samples: 4096,
            max_layers: 256,
            max_dim: 16_384,
            max_width: 4096,
            max_tokens: 1 << 20,
        }
    }
}

/// Compressed frames of at most this many bytes may expand past [`Limits::max_expansion`] (zstd's own framing
/// dominates tiny frames).
const EXPANSION_SLACK: usize = 4096;

fn frame_err(m: impl Into<String>) -> Error {
    Error::Frame(m.into())
}

impl Frame {
    pub fn samples(
        ids: Vec<SampleId>,
        layers: usize,
        dim: usize,
        activations: Vec<f32>,
        width: usize,
        values: Vec<f32>,
    ) -> Self {
        Self { kind: FrameKind::Samples, ids, layers, dim, activations, lens: vec![], labels: vec![], width, values }
    }

    /// Targets (`kind = Targets`) or outputs (`kind = Outputs`): one row of `width` values per id.
    pub fn rows(kind: FrameKind, ids: Vec<SampleId>, width: usize, values: Vec<f32>) -> Self {
        Self { kind, ids, layers: 0, dim: 0, activations: vec![], lens: vec![], labels: vec![], width, values }
    }

    /// A `mobillm`-mode batch: `activations` holds every token of every sample (`lens[i]` tokens each), token
    /// after token, each token's `layers` vectors of `dim`; `prior` holds the backbone's `width` label logits per
    /// sample.
    #[allow(clippy::too_many_arguments)]
    pub fn sequences(
        ids: Vec<SampleId>,
        layers: usize,
        dim: usize,
        activations: Vec<f32>,
        lens: Vec<u32>,
        labels: Vec<u32>,
        width: usize,
        prior: Vec<f32>,
    ) -> Self {
        Self { kind: FrameKind::Sequences, ids, layers, dim, activations, lens, labels, width, values: prior }
    }

    /// For a sequences frame: each sample's last token (the pivot), `[n · layers · dim]`, sample after sample.
    pub fn pivot_rows(&self) -> Result<Vec<f32>> {
        let per = self.layers * self.dim;
        let tokens: usize = self.lens.iter().map(|&l| l as usize).sum();
        if self.kind != FrameKind::Sequences || self.lens.contains(&0) || self.activations.len() != tokens * per {
            return Err(Error::InvalidInput(format!("not a consistent sequences frame ({:?})", self.kind)));
        }
        let mut out = Vec::with_capacity(self.lens.len() * per);
        let mut end = 0usize;
        for &len in &self.lens {
            end += len as usize;
            out.extend_from_slice(&self.activations[(end - 1) * per..end * per]);
        }
        Ok(out)
    }

    fn vectors(&self) -> usize {
        match self.kind {
            FrameKind::Samples => self.ids.len() * self.layers,
            FrameKind::Sequences => self.lens.iter().map(|&l| l as usize).sum::<usize>() * self.layers,
            FrameKind::Targets | FrameKind::Outputs => 0,
        }
    }

    /// Encodes and compresses the frame.
    pub fn encode(&self, quant: Quant) -> Result<Vec<u8>> {
        let n = self.ids.len();
        let vectors = self.vectors();
        let consistent = self.values.len() == n * self.width
            && self.activations.len() == vectors * self.dim
            && (self.kind != FrameKind::Sequences || (self.lens.len() == n && self.labels.len() == n));
        if !consistent {
            return Err(Error::InvalidInput(format!("inconsistent {:?} frame for {n} samples", self.kind)));
        }
        let mut body =
            Vec::with_capacity(COUNTS_LEN + 16 * n + vectors * quant.vector_bytes(self.dim) + 4 * self.values.len());
        let seq_total: usize = self.lens.iter().map(|&l| l as usize).sum();
        for v in [n, self.layers, self.dim, self.width, seq_total] {
            body.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for id in &self.ids {
            body.extend_from_slice(&id.0);
        }
        if self.kind == FrameKind::Sequences {
            for v in self.lens.iter().chain(&self.labels) {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
        if self.dim > 0 {
            for vector in self.activations.chunks_exact(self.dim) {
                quantize_into(vector, quant, &mut body)?;
            }
        }
        for v in &self.values {
            if !v.is_finite() {
                return Err(Error::InvalidInput("frame values must be finite".into()));
            }
            body.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len() / 2);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.push(quant.code());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let compressed = zstd::bulk::compress(&body, ZSTD_LEVEL).map_err(|e| frame_err(format!("zstd: {e}")))?;
        out.extend_from_slice(&compressed);
        Ok(out)
    }

    /// Decodes a frame, enforcing `limits` before and during decompression.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<(Frame, Quant)> {
        decode_as(bytes, limits)
    }
}

impl Frame<f16> {
    /// As [`Frame::decode`], with activations kept as f16 (what the server stores): half the memory of f32 and
    /// no conversion back. Every activation fits f16, since the decoder refuses those that would not.
    pub fn decode_f16(bytes: &[u8], limits: &Limits) -> Result<(Frame<f16>, Quant)> {
        decode_as(bytes, limits)
    }
}

/// The prefix of an encoded frame, read without decompressing anything: what a server needs to reserve memory
/// before it decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub kind: FrameKind,
    pub quant: Quant,
    /// The body's length once decompressed, as the sender declared it (checked while decoding).
    pub decoded_len: u64,
}

impl Prefix {
    pub fn read(bytes: &[u8]) -> Result<Prefix> {
        if bytes.len() < PREFIX_LEN {
            return Err(frame_err(format!("truncated frame: {} bytes, the prefix alone is {PREFIX_LEN}", bytes.len())));
        }
        if bytes[..4] != MAGIC {
            return Err(frame_err("bad magic: not a MobiLLM frame"));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(frame_err(format!("unsupported frame version {version} (this server speaks {VERSION})")));
        }
        let kind =
            FrameKind::from_code(bytes[6]).ok_or_else(|| frame_err(format!("unknown frame kind {}", bytes[6])))?;
        let quant =
            Quant::from_code(bytes[7]).ok_or_else(|| frame_err(format!("unknown quantisation {}", bytes[7])))?;
        let decoded_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        Ok(Prefix { kind, quant, decoded_len })
    }

    /// Bytes of decoded activations per byte of decoded body, at most, for activations of `A` (f32 or f16): what
    /// dequantising can add on top of the body itself.
    pub fn activation_expansion(&self, element_bytes: usize) -> usize {
        let values_per_byte = match self.quant {
            Quant::F16 => 1, // 2 bytes per value: ≤ 1 value per byte, rounded up
            Quant::Int8 => 1,
            Quant::Int4 => 2,
        };
        values_per_byte * element_bytes
    }
}
