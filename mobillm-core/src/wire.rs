//! The binary frames of the `/v1` protocol (design §6). A frame is a 20-byte plain prefix followed by a zstd
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

use std::io::Read;

use half::f16;

use crate::error::{Error, Result};
use crate::side::SampleId;

pub const MAGIC: [u8; 4] = *b"MBLF";
pub const VERSION: u16 = 1;
const PREFIX_LEN: usize = 20;
const COUNTS_LEN: usize = 20;
/// Values per int4 scale group.
pub const INT4_GROUP: usize = 32;
/// zstd level for frames: fast on a phone, and activations do not compress much further at higher levels.
pub const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    F16,
    /// Per-vector absmax, one f16 scale per vector (the default).
    Int8,
    /// Packed nibbles, one f16 absmax scale per group of 32 values.
    Int4,
}

impl Quant {
    fn code(self) -> u8 {
        match self {
            Quant::F16 => 0,
            Quant::Int8 => 1,
            Quant::Int4 => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        [Quant::F16, Quant::Int8, Quant::Int4].into_iter().find(|q| q.code() == c)
    }
    /// Encoded bytes of one vector of `dim` values.
    pub fn vector_bytes(self, dim: usize) -> usize {
        match self {
            Quant::F16 => 2 * dim,
            Quant::Int8 => dim + 2,
            Quant::Int4 => dim.div_ceil(2) + 2 * dim.div_ceil(INT4_GROUP),
        }
    }
}

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

fn decode_as<A: Element>(bytes: &[u8], limits: &Limits) -> Result<(Frame<A>, Quant)> {
    let Prefix { kind, quant, decoded_len: declared } = Prefix::read(bytes)?;
    if declared > limits.max_decoded_bytes as u64 {
        return Err(frame_err(format!(
            "declared body of {declared} bytes exceeds the limit of {}",
            limits.max_decoded_bytes
        )));
    }
    let compressed = bytes.len() - PREFIX_LEN;
    let expansion_cap = compressed.saturating_mul(limits.max_expansion).max(EXPANSION_SLACK);
    if declared > expansion_cap as u64 {
        return Err(frame_err(format!(
            "declared body of {declared} bytes from {compressed} compressed bytes inflates more than {}:1",
            limits.max_expansion
        )));
    }
    let declared = declared as usize;
    // Inflate at most one byte past the declared length: enough to detect a lie without inflating a bomb.
    let mut decoder =
        zstd::stream::read::Decoder::new(&bytes[PREFIX_LEN..]).map_err(|e| frame_err(format!("zstd: {e}")))?;
    let mut body = Vec::new();
    body.try_reserve_exact(declared).map_err(|_| frame_err(format!("no memory for a body of {declared} bytes")))?;
    (&mut decoder)
        .take(declared as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| frame_err(format!("corrupt or truncated zstd stream: {e}")))?;
    if body.len() != declared {
        return Err(frame_err(if body.len() > declared {
            format!("body is larger than its declared {declared} bytes")
        } else {
            format!("body has {} bytes, {declared} declared", body.len())
        }));
    }
    Ok((parse_body(kind, quant, &body, limits)?, quant))
}

/// An activation value as a decoded frame holds it.
pub trait Element: Copy {
    fn from_f32(v: f32) -> Self;
    fn from_f16(v: f16) -> Self;
}

impl Element for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f16(v: f16) -> Self {
        v.to_f32()
    }
}

impl Element for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn from_f16(v: f16) -> Self {
        v
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| frame_err(format!("body ends inside {what}")))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")) as usize)
    }
}

fn parse_body<A: Element>(kind: FrameKind, quant: Quant, body: &[u8], limits: &Limits) -> Result<Frame<A>> {
    let mut c = Cursor { bytes: body, at: 0 };
    let (n, layers, dim, width, seq_total) =
        (c.u32("counts")?, c.u32("counts")?, c.u32("counts")?, c.u32("counts")?, c.u32("counts")?);
    let over = |what: &str, v: usize, max: usize| -> Result<()> {
        if v > max {
            return Err(frame_err(format!("{what} {v} exceeds the limit of {max}")));
        }
        Ok(())
    };
    over("samples", n, limits.max_samples)?;
    over("width", width, limits.max_width)?;
    let has_acts = matches!(kind, FrameKind::Samples | FrameKind::Sequences);
    if has_acts {
        over("layers", layers, limits.max_layers)?;
        over("dimension", dim, limits.max_dim)?;
        if layers == 0 || dim == 0 {
            return Err(frame_err("a frame with activations needs layers and dim > 0"));
        }
    } else if layers != 0 || dim != 0 || seq_total != 0 {
        return Err(frame_err(format!("a {kind:?} frame carries no activations")));
    }
    if kind != FrameKind::Sequences && seq_total != 0 {
        return Err(frame_err("only sequence frames have token counts"));
    }
    over("tokens", seq_total, limits.max_tokens)?;
    // Every size below is bounded by the limits above, so the products cannot overflow on 64-bit targets; check
    // the total against the actual body before allocating anything from it.
    let vectors = match kind {
        FrameKind::Samples => n * layers,
        FrameKind::Sequences => seq_total * layers,
        _ => 0,
    };
    let seq_header = if kind == FrameKind::Sequences { 8 * n } else { 0 };
    let expected = COUNTS_LEN + 16 * n + seq_header + vectors * quant.vector_bytes(dim) + 4 * n * width;
    if expected != body.len() {
        return Err(frame_err(format!(
            "the counts imply a body of {expected} bytes, it has {} (n={n}, layers={layers}, dim={dim}, width={width})",
            body.len()
        )));
    }
    let ids: Vec<SampleId> =
        c.take(16 * n, "ids")?.chunks_exact(16).map(|b| SampleId(b.try_into().expect("16"))).collect();
    let (mut lens, mut labels) = (Vec::new(), Vec::new());
    if kind == FrameKind::Sequences {
        lens = (0..n).map(|_| c.u32("lengths").map(|v| v as u32)).collect::<Result<_>>()?;
        labels = (0..n).map(|_| c.u32("labels").map(|v| v as u32)).collect::<Result<_>>()?;
        if lens.iter().map(|&l| l as usize).sum::<usize>() != seq_total {
            return Err(frame_err("sequence lengths do not add up to the token count"));
        }
        if lens.contains(&0) {
            return Err(frame_err("empty sequence"));
        }
    }
    let mut activations = Vec::new();
    activations
        .try_reserve_exact(vectors * dim)
        .map_err(|_| frame_err(format!("no memory for {} activation values", vectors * dim)))?;
    for _ in 0..vectors {
        dequantize_from(c.take(quant.vector_bytes(dim), "activations")?, dim, quant, &mut activations)?;
    }
    let values: Vec<f32> = c
        .take(4 * n * width, "values")?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(frame_err("values contain NaN or infinity"));
    }
    Ok(Frame { kind, ids, layers, dim, activations, lens, labels, width, values })
}

fn quantize_into(x: &[f32], quant: Quant, out: &mut Vec<u8>) -> Result<()> {
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::InvalidInput("activations must be finite".into()));
    }
    let absmax = |xs: &[f32]| xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    match quant {
        Quant::F16 => x.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        Quant::Int8 => {
            let scale = f16::from_f32(absmax(x) / 127.0);
            let s = scale.to_f32();
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend(x.iter().map(|v| if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) as i8 as u8 } else { 0 }));
        }
        Quant::Int4 => {
            let scales: Vec<f16> = x.chunks(INT4_GROUP).map(|g| f16::from_f32(absmax(g) / 7.0)).collect();
            scales.iter().for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
            let codes: Vec<u8> = x
                .chunks(INT4_GROUP)
                .zip(&scales)
                .flat_map(|(group, s)| {
                    let s = s.to_f32();
                    group
                        .iter()
                        .map(move |v| if s > 0.0 { ((v / s).round().clamp(-7.0, 7.0) as i8 + 8) as u8 } else { 8 })
                })
                .collect();
            out.extend(codes.chunks(2).map(|p| p[0] | (p.get(1).copied().unwrap_or(8) << 4)));
        }
    }
    Ok(())
}

/// The largest magnitude a decoded activation may have: the server keeps activations as f16, so a value past
/// f16's range would be stored as infinity and poison the session.
const MAX_ACTIVATION: f32 = 65504.0;

fn dequantize_from<A: Element>(bytes: &[u8], dim: usize, quant: Quant, out: &mut Vec<A>) -> Result<()> {
    // `top` is the largest code magnitude the quantisation can hold, so scale · top bounds every value.
    let scale_at = |b: &[u8], i: usize, top: f32| -> Result<f32> {
        let s = f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
        if !s.is_finite() || s < 0.0 {
            return Err(frame_err(format!("invalid quantisation scale {s}")));
        }
        if s * top > MAX_ACTIVATION {
            return Err(frame_err(format!("quantisation scale {s} gives values past f16's range")));
        }
        Ok(s)
    };
    match quant {
        Quant::F16 => {
            for p in bytes.chunks_exact(2) {
                let v = f16::from_le_bytes([p[0], p[1]]);
                if !v.is_finite() {
                    return Err(frame_err("activations contain NaN or infinity"));
                }
                out.push(A::from_f16(v));
            }
        }
        Quant::Int8 => {
            let s = scale_at(bytes, 0, 128.0)?;
            out.extend(bytes[2..].iter().map(|&q| A::from_f32(q as i8 as f32 * s)));
        }
        Quant::Int4 => {
            let groups = dim.div_ceil(INT4_GROUP);
            let scales = (0..groups).map(|g| scale_at(bytes, g, 8.0)).collect::<Result<Vec<_>>>()?;
            let packed = &bytes[2 * groups..];
            for i in 0..dim {
                let nibble = (packed[i / 2] >> (4 * (i % 2))) & 0x0F;
                out.push(A::from_f32((nibble as f32 - 8.0) * scales[i / INT4_GROUP]));
            }
        }
    }
    Ok(())
}
