//! The stolen model: the server's adapter checkpoint run on the public backbone's plain activations, without the
//! device's Q, alone or added to the backbone's logits. The thief is also granted the one offset per label that
//! fits the public texts best (`attacks::calibrated_accuracy`): a backbone whose zero-shot answer is nearly always
//! one label becomes a good classifier with that offset alone, so a stolen checkpoint that merely shifts the
//! logits would otherwise look like it carried what the session learned.

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use mobillm_core::side::{weights_file, SideNet};
use serde_json::{json, Value};

use super::attacks::{accuracy, argmax_rows, calibrated_accuracy, Mat};
use super::Case;

/// The checkpoint's accuracy on the public texts (`null` when the server kept none).
pub fn attack(c: &Case) -> Result<Value> {
    let (view, k) = (c.view, c.k);
    let acts = &view.acts;
    let (t, kl) = (acts.t, k.n_labels);
    let public = &c.public;
    let public_y = k.public_labels();
    Ok(match &view.weights {
        Some(bytes) => {
            eprintln!("audit: stolen adapter");
            let (tensors, _) = weights_file::from_bytes(bytes).map_err(|e| anyhow!("the stored checkpoint: {e}"))?;
            let net = SideNet::from_tensors(&view.side, &weights_file::as_refs(&tensors))?;
            let dtype = net.tensors()[0].1.dtype();
            let (np, w) = (public.len(), t * acts.d);
            let x = Tensor::from_slice(&k.everyone.flat[k.n_train * w..], (np, t, acts.d), &Device::Cpu)?;
            let o = net.forward(&x.to_dtype(dtype)?)?.to_dtype(DType::F32)?.narrow(1, 0, kl)?.contiguous()?;
            let o = Mat::from_row_slice(np, kl, &o.flatten_all()?.to_vec1::<f32>()?);
            let with_backbone = &k.public_logits + &o;
            json!({
                "adapter_alone": calibrated_accuracy(&o, public_y),
                "with_public_backbone": calibrated_accuracy(&with_backbone, public_y),
                "zero_shot": calibrated_accuracy(&k.public_logits, public_y),
                "uncalibrated": {
                    "adapter_alone": accuracy(&argmax_rows(&o), public_y),
                    "with_public_backbone": accuracy(&argmax_rows(&with_backbone), public_y),
                    "zero_shot": accuracy(&argmax_rows(&k.public_logits), public_y),
                },
            })
        }
        None => Value::Null,
    })
}
