//! Quantisation of activation vectors on the wire: f16, int8 with one f16 absmax scale per vector, int4 with one
//! per group of 32. Decoding refuses scales that would give values past f16's range (the server stores f16).

use half::f16;

use super::{frame_err, Element};
use crate::error::{Error, Result};

/// Values per int4 scale group.
pub const INT4_GROUP: usize = 32;
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
    pub(super) fn code(self) -> u8 {
        match self {
            Quant::F16 => 0,
            Quant::Int8 => 1,
            Quant::Int4 => 2,
        }
    }
    pub(super) fn from_code(c: u8) -> Option<Self> {
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

pub(super) fn quantize_into(x: &[f32], quant: Quant, out: &mut Vec<u8>) -> Result<()> {
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

pub(super) fn dequantize_from<A: Element>(bytes: &[u8], dim: usize, quant: Quant, out: &mut Vec<A>) -> Result<()> {
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
