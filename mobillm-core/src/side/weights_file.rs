//! Side-network parameters as safetensors bytes (f32 tensors plus string metadata): the device adapter file, the
//! server's checkpoints and the adapter the server sends all use this one encoding.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

pub type Named = Vec<(String, Tensor)>;

pub fn to_bytes(tensors: &[(&str, Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| -> Result<_> {
            let t = t.to_dtype(DType::F32)?;
            let bytes: Vec<u8> = t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((name.to_string(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let views = raw
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::InvalidInput(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::InvalidInput(format!("serializing: {e}")))
}

/// Parses bytes written by [`to_bytes`]; every failure is a string reason for the caller to wrap.
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<(Named, HashMap<String, String>), String> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format!("tensor `{name}` is {:?}, expected F32", view.dtype()));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let t = Tensor::from_vec(values, view.shape(), &Device::Cpu).map_err(|e| e.to_string())?;
        tensors.push((name, t));
    }
    Ok((tensors, meta))
}

pub fn as_refs(named: &Named) -> Vec<(&str, Tensor)> {
    named.iter().map(|(n, t)| (n.as_str(), t.clone())).collect()
}
