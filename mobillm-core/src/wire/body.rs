//! Decoding a frame's body: the declared length and expansion checked before anything is inflated, then every
//! count and dimension checked against the body and the caller's limits.

use std::io::Read;

use half::f16;

use super::quant::{dequantize_from, Quant};
use super::{frame_err, Frame, FrameKind, Limits, Prefix, COUNTS_LEN, EXPANSION_SLACK, PREFIX_LEN};
use crate::error::Result;
use crate::side::SampleId;

pub(super) fn decode_as<A: Element>(bytes: &[u8], limits: &Limits) -> Result<(Frame<A>, Quant)> {
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
