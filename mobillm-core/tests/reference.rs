//! The forward agrees with candle-transformers' reference implementations on tiny random models written to real
//! files: `quantized_llama` for GGUF (every supported small-model tensor type, tied and untied heads) and `llama`
//! for safetensors. The reference computes with dequantized weights (`CANDLE_DEQUANTIZE_ALL`), the same math as
//! ours, so the tolerance is float rounding.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama as ref_llama, quantized_llama};
use common::*;
use mobillm_core::Backbone;

fn dequantize_reference() {
    // Read once per thread by candle; every test here sets it before building a reference model.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
}

fn label_ids(vocab: usize) -> Vec<u32> {
    vec![3, 17, (vocab - 2) as u32, 200]
}

/// Reference logits at the last position for each prompt, restricted to `labels`.
fn quantized_llama_logits(path: &std::path::Path, prompts: &[Vec<u32>], labels: &[u32]) -> Vec<Vec<f32>> {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    prompts
        .iter()
        .map(|p| {
            model.clear_kv_cache();
            let ids = Tensor::new(p.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&ids, 0).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            labels.iter().map(|&l| logits[l as usize]).collect()
        })
        .collect()
}

fn our_logits(backbone: &Backbone, prompts: &[Vec<u32>], labels: &[u32]) -> Vec<Vec<f32>> {
    prompts
        .iter()
        .map(|p| {
            let out = backbone.llama().forward_pivots(std::slice::from_ref(p), &[LAYERS - 1], labels).unwrap();
            out.label_logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[test]
fn gguf_matches_candle_quantized_llama_for_every_tensor_type() {
    dequantize_reference();
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tied) in [
        (GgmlDType::F32, true),
        (GgmlDType::F32, false),
        (GgmlDType::F16, true),
        (GgmlDType::Q8_0, true),
        (GgmlDType::Q4_0, false),
        (GgmlDType::Q4_1, true),
    ] {
        let model = tiny_model(7, tied);
        let path = dir.path().join(format!("tiny-{dtype:?}-{tied}.gguf"));
        write_gguf(&model, &path, dtype);
        let backbone = Backbone::load(&path).unwrap();
        let prompts = random_prompts(11, 6, model.vocab_size(), 24);
        let labels = label_ids(model.vocab_size());
        let ours = our_logits(&backbone, &prompts, &labels);
        let reference = quantized_llama_logits(&path, &prompts, &labels);
        for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
            assert_close(a, b, 1e-4, &format!("{dtype:?} tied={tied} prompt {i}"));
        }
    }
}

#[test]
fn safetensors_matches_candle_llama() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let model = tiny_model(21, tied);
        let mdir = dir.path().join(format!("st-{tied}"));
        write_safetensors_dir(&model, &mdir);
        let backbone = Backbone::load(&mdir).unwrap();

        let cfg: ref_llama::LlamaConfig =
            serde_json::from_str(&std::fs::read_to_string(mdir.join("config.json")).unwrap()).unwrap();
        let cfg = cfg.into_config(false);
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[mdir.join("model.safetensors")], DType::F32, &Device::Cpu)
                .unwrap()
        };
        let reference = ref_llama::Llama::load(vb, &cfg).unwrap();
        let prompts = random_prompts(5, 6, model.vocab_size(), 30);
        let labels = label_ids(model.vocab_size());
        let ours = our_logits(&backbone, &prompts, &labels);
        for (i, p) in prompts.iter().enumerate() {
            let mut cache = ref_llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
            let ids = Tensor::new(p.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = reference.forward(&ids, 0, &mut cache).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let expected: Vec<f32> = labels.iter().map(|&l| logits[l as usize]).collect();
            assert_close(&ours[i], &expected, 1e-4, &format!("tied={tied} prompt {i}"));
        }
    }
}

/// The same weights as an F32 GGUF (Q/K rows permuted the llama.cpp way) and as safetensors give the same taps at
/// every block and the same logits: the loader's un-permutation is exact.
#[test]
fn gguf_and_safetensors_give_the_same_taps() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(33, false);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&model, &gguf, GgmlDType::F32);
    let st = dir.path().join("st");
    write_safetensors_dir(&model, &st);
    let a = Backbone::load(&gguf).unwrap();
    let b = Backbone::load(&st).unwrap();
    let prompts = random_prompts(9, 5, model.vocab_size(), 20);
    let taps: Vec<usize> = (0..LAYERS).collect();
    let labels = label_ids(model.vocab_size());
    let oa = a.llama().forward_pivots(&prompts, &taps, &labels).unwrap();
    let ob = b.llama().forward_pivots(&prompts, &taps, &labels).unwrap();
    assert_eq!(oa.taps.dims(), &[5, LAYERS, HIDDEN]);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_close(&flat(&oa.taps), &flat(&ob.taps), 1e-5, "taps");
    assert_close(&flat(&oa.label_logits), &flat(&ob.label_logits), 1e-5, "logits");
}
