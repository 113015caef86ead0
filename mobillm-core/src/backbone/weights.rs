//! Weight storage for the frozen backbone. GGUF weights stay quantized in memory (a phone holds the 98 MB file,
//! not the 540 MB of f32 it decodes to) and are expanded one block at a time, just before that block runs;
//! safetensors weights are kept dense.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// A 2-D weight matrix `[rows, cols]`, PyTorch orientation (`y = x · Wᵀ`).
#[derive(Debug)]
pub enum Weight {
    Quantized(QTensor),
    Dense(Tensor),
}

impl Weight {
    /// The whole matrix as f32. For quantized weights this allocates `rows × cols × 4` bytes that live as long as
    /// the returned tensor, which is why the forward expands each matrix just before it is used.
    pub fn dense(&self) -> Result<Tensor> {
        self.dense_rows(0, self.dims()[0])
    }

    /// Rows `start..start + len` as f32 `[len, cols]`, decoding only those rows (on all cores).
    pub fn dense_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        Ok(match self {
            Weight::Quantized(q) => dequantize_rows(q, start, len)?,
            Weight::Dense(t) => t.narrow(0, start, len)?,
        })
    }

    /// Selected rows as f32 `[ids.len(), cols]`, decoding only those rows (embedding lookups, label-word heads).
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let ids_t = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
        Ok(match self {
            Weight::Quantized(q) => q.embedding(&ids_t)?,
            Weight::Dense(t) => t.index_select(&ids_t, 0)?,
        })
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Quantized(q) => q.shape().dims(),
            Weight::Dense(t) => t.dims(),
        }
    }

    /// Bytes this weight occupies in memory as stored.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Weight::Quantized(q) => q.storage_size_in_bytes(),
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// Feeds the stored bytes to `sink` (for fingerprints).
    pub fn hash_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        match self {
            Weight::Quantized(q) => {
                if let Ok(bytes) = q.data() {
                    sink(&bytes);
                }
            }
            Weight::Dense(t) => {
                if let Ok(v) = t.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
                    for x in v {
                        sink(&x.to_le_bytes());
                    }
                }
            }
        }
    }

    pub fn dtype_name(&self) -> String {
        match self {
            Weight::Quantized(q) => format!("{:?}", q.dtype()),
            Weight::Dense(t) => format!("{:?}", t.dtype()),
        }
    }
}

/// Tensor types the GGUF loader accepts: the formats small-device Llama GGUFs use (docs/design.md §2), plus the K-quants
/// that "Q4_K_M"-style files mix in.
pub const SUPPORTED_GGUF_TYPES: &str = "F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K";

pub fn is_supported_gguf_type(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q8_0
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// A 1-D f32 vector (norm gains) from any stored form.
pub fn vector_f32(w: &Weight) -> Result<Tensor> {
    Ok(w.dense()?.to_dtype(DType::F32)?.flatten_all()?)
}

/// candle's `QTensor::dequantize` decodes the whole tensor on one thread; the forward expands every matrix once
/// per batch, so decoding row ranges on all cores matters (≈20% of the forward's time when single-threaded).
fn dequantize_rows(q: &QTensor, start: usize, len: usize) -> Result<Tensor> {
    let dims = q.shape().dims();
    let (rows, cols) = (dims[0], dims[1..].iter().product::<usize>());
    if start + len > rows {
        return Err(crate::Error::InvalidInput(format!("rows {start}..{} of a {rows}-row weight", start + len)));
    }
    let range = (start * cols, len * cols);
    let decoded = match q.dtype() {
        GgmlDType::Q4_0 => decode_blocks::<BlockQ4_0>(q, range)?,
        GgmlDType::Q4_1 => decode_blocks::<BlockQ4_1>(q, range)?,
        GgmlDType::Q8_0 => decode_blocks::<BlockQ8_0>(q, range)?,
        GgmlDType::Q4K => decode_blocks::<BlockQ4K>(q, range)?,
        GgmlDType::Q5K => decode_blocks::<BlockQ5K>(q, range)?,
        GgmlDType::Q6K => decode_blocks::<BlockQ6K>(q, range)?,
        _ => None,
    };
    let mut shape = dims.to_vec();
    shape[0] = len;
    match decoded {
        Some(values) => Ok(Tensor::from_vec(values, shape, &Device::Cpu)?),
        None => Ok(q.dequantize(&Device::Cpu)?.narrow(0, start, len)?),
    }
}

/// Blocks decoded per parallel task: 64 blocks of 32 values = 8 KB of f32 output.
const BLOCKS_PER_TASK: usize = 64;

/// Decodes values `first..first + count` (both multiples of the block size, as whole rows are) of a quantized
/// tensor; `None` if its storage cannot be viewed as blocks of `T`.
fn decode_blocks<T: GgmlType + Sync>(q: &QTensor, (first, count): (usize, usize)) -> Result<Option<Vec<f32>>> {
    let bytes = q.data()?;
    let n_blocks = bytes.len() / std::mem::size_of::<T>();
    let ptr = bytes.as_ptr();
    if ptr.align_offset(std::mem::align_of::<T>()) != 0
        || n_blocks * std::mem::size_of::<T>() != bytes.len()
        || !first.is_multiple_of(T::BLCK_SIZE)
        || !count.is_multiple_of(T::BLCK_SIZE)
        || (first + count) / T::BLCK_SIZE > n_blocks
    {
        return Ok(None);
    }
    // SAFETY: a CPU QTensor of this dtype stores a `Vec<T>` and `data()` borrows exactly its bytes; alignment and
    // length were checked above, and the slice does not outlive `bytes`.
    let blocks: &[T] = unsafe { std::slice::from_raw_parts(ptr as *const T, n_blocks) };
    let blocks = &blocks[first / T::BLCK_SIZE..(first + count) / T::BLCK_SIZE];
    let mut out = vec![0f32; count];
    out.par_chunks_mut(BLOCKS_PER_TASK * T::BLCK_SIZE)
        .zip(blocks.par_chunks(BLOCKS_PER_TASK))
        .for_each(|(ys, xs)| T::to_float(xs, ys));
    Ok(Some(out))
}
