//! Activations kept on the device to train on (`local` mode): `[N, T, d]` as int8 codes with one f32 absmax
//! scale per vector (one tapped layer of one example), a quarter of f32's memory — 2400 UCI examples of
//! SmolLM2's 30 × 576 pivots take 41.5 MB instead of 166 MB. Rows are written as each forward batch comes back
//! and decoded a mini-batch at a time. The codes are the wire's per-vector absmax int8 (`wire::quant`; the
//! scale kept as f32), so a network trained on them sees what a `pae` server would.

use candle_core::{DType, Device, Tensor};

use super::trainer::TrainingInputs;
use crate::error::{Error, Result};

/// Int8 rows `[N, T, d]`, written by an [`Int8RowsWriter`] in any order.
#[derive(Debug, Clone)]
pub struct Int8Rows {
    dims: (usize, usize, usize),
    /// `[N, T, d]`, code + 128.
    codes: Vec<u8>,
    /// `[N, T]`.
    scales: Vec<f32>,
}

/// Codes and scales being written; [`Int8RowsWriter::finish`] turns them into [`Int8Rows`].
pub struct Int8RowsWriter {
    rows: Int8Rows,
}

impl Int8RowsWriter {
    /// Room for `n` examples of `t` vectors of `d` values, all zero until written.
    pub fn new(n: usize, t: usize, d: usize) -> Self {
        Self { rows: Int8Rows { dims: (n, t, d), codes: vec![128; n * t * d], scales: vec![0.0; n * t] } }
    }

    /// Writes `x: [G, T, d]` (f32) as rows `group` (G indices into `0..N`).
    pub fn write(&mut self, group: &[usize], x: &Tensor) -> Result<()> {
        let rows = &mut self.rows;
        let (n, t, d) = rows.dims;
        if x.dims() != [group.len(), t, d] {
            return Err(Error::InvalidInput(format!(
                "rows have shape {:?}, expected [{}, {t}, {d}]",
                x.dims(),
                group.len()
            )));
        }
        let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (row, &i) in values.chunks(t * d).zip(group) {
            if i >= n {
                return Err(Error::InvalidInput(format!("row {i} is past the buffer's {n} rows")));
            }
            for (j, vector) in row.chunks(d).enumerate() {
                if vector.iter().any(|v| !v.is_finite()) {
                    return Err(Error::InvalidInput(format!("row {i}, vector {j}: activations must be finite")));
                }
                let scale = vector.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                rows.scales[i * t + j] = scale;
                let codes = &mut rows.codes[(i * t + j) * d..(i * t + j + 1) * d];
                for (c, v) in codes.iter_mut().zip(vector) {
                    let q = if scale > 0.0 { (v / scale).round().clamp(-127.0, 127.0) } else { 0.0 };
                    *c = (q as i32 + 128) as u8;
                }
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Int8Rows {
        self.rows
    }
}

impl Int8Rows {
    /// Bytes held: the codes and their scales.
    pub fn bytes(&self) -> usize {
        let (n, t, d) = self.dims;
        Self::bytes_for(n, t, d)
    }

    /// Bytes that `n` rows of `t` vectors of `d` values take.
    pub fn bytes_for(n: usize, t: usize, d: usize) -> usize {
        n * t * (d + 4)
    }

    /// Rows `idx` decoded to f32 `[B, T, d]`, straight into the one tensor returned.
    pub fn decode(&self, idx: &[u32]) -> Result<Tensor> {
        let (n, t, d) = self.dims;
        let mut out = Vec::with_capacity(idx.len() * t * d);
        for &i in idx {
            let i = i as usize;
            if i >= n {
                return Err(Error::InvalidInput(format!("row {i} is past the buffer's {n} rows")));
            }
            let codes = self.codes[i * t * d..(i + 1) * t * d].chunks(d);
            for (vector, &scale) in codes.zip(&self.scales[i * t..(i + 1) * t]) {
                out.extend(vector.iter().map(|&c| (c as f32 - 128.0) * scale));
            }
        }
        Ok(Tensor::from_vec(out, (idx.len(), t, d), &Device::Cpu)?)
    }
}

impl TrainingInputs for Int8Rows {
    fn dims(&self) -> Vec<usize> {
        vec![self.dims.0, self.dims.1, self.dims.2]
    }

    fn rows(&self, idx: &[u32]) -> Result<Tensor> {
        self.decode(idx)
    }

    /// Codes are finite by construction and scales were computed from finite values.
    fn check_finite(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_within_half_a_step_of_their_scale_in_any_write_order() {
        let x = Tensor::randn(0f32, 1.0, (5, 3, 40), &Device::Cpu).unwrap();
        let rows_of = |idx: &[u32]| x.index_select(&Tensor::new(idx, &Device::Cpu).unwrap(), 0).unwrap();
        let mut w = Int8RowsWriter::new(5, 3, 40);
        w.write(&[4, 1], &rows_of(&[4, 1])).unwrap();
        w.write(&[0, 2, 3], &rows_of(&[0, 2, 3])).unwrap();
        let rows = w.finish();
        assert_eq!(rows.bytes(), 5 * 3 * 44);
        let back = rows.decode(&[0, 1, 2, 3, 4]).unwrap();
        let err = (&back - &x).unwrap().abs().unwrap();
        let absmax = x.abs().unwrap().max_keepdim(2).unwrap();
        // Rounding leaves at most half a code step (absmax / 127 / 2) per value.
        let bound = (absmax / 254.0).unwrap().broadcast_as(x.shape()).unwrap();
        let over = err.gt(&(bound + 1e-6).unwrap()).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
        assert_eq!(over.to_scalar::<f32>().unwrap(), 0.0);
        assert!(err.max_keepdim(2).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "int8 is lossy");
    }

    #[test]
    fn wrong_shapes_rows_past_the_end_and_non_finite_values_are_refused() {
        let mut w = Int8RowsWriter::new(2, 1, 4);
        let ok = Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(w.write(&[0, 1], &ok), Err(Error::InvalidInput(m)) if m.contains("shape")));
        assert!(matches!(w.write(&[2], &ok), Err(Error::InvalidInput(m)) if m.contains("past")));
        let nan = Tensor::new(&[[[1f32, f32::NAN, 0.0, 0.0]]], &Device::Cpu).unwrap();
        assert!(matches!(w.write(&[1], &nan), Err(Error::InvalidInput(m)) if m.contains("finite")));
        let zero = Tensor::zeros((1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        w.write(&[0], &zero).unwrap();
        let rows = w.finish();
        let back = rows.decode(&[0]).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0; 4], "a zero vector stays zero");
        assert!(matches!(rows.decode(&[2]), Err(Error::InvalidInput(m)) if m.contains("past")));
    }
}
