//! The wire codec: round trips at each quantisation, its error bounds, and refusal of every malformed frame.

mod common;

use std::io::Read;

use common::Rng;
use mobillm_core::side::SampleId;
use mobillm_core::wire::{Frame, FrameKind, Limits, Quant, INT4_GROUP, MAGIC};
use mobillm_core::Error;

const LAYERS: usize = 30;
const DIM: usize = 576;
const K_OUT: usize = 8;

fn ids(n: usize) -> Vec<SampleId> {
    (0..n).map(|_| SampleId::random().unwrap()).collect()
}

/// Activations shaped like rotated unit-RMS pivots, with a few outliers.
fn activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n * LAYERS * DIM).map(|i| if i % 97 == 0 { 6.0 * rng.unit() } else { 1.7 * rng.unit() }).collect()
}

fn sample_frame(n: usize) -> Frame {
    let mut rng = Rng::new(1);
    let acts = activations(&mut rng, n);
    let targets: Vec<f32> = (0..n * K_OUT).map(|_| rng.unit()).collect();
    Frame::samples(ids(n), LAYERS, DIM, acts, K_OUT, targets)
}

#[test]
fn sample_frames_round_trip_within_the_quantisation_error() {
    let frame = sample_frame(16);
    for quant in [Quant::F16, Quant::Int8, Quant::Int4] {
        let bytes = frame.encode(quant).unwrap();
        let (back, q) = Frame::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(q, quant);
        assert_eq!(
            (back.kind, &back.ids, back.layers, back.dim, back.width),
            (FrameKind::Samples, &frame.ids, LAYERS, DIM, K_OUT)
        );
        assert_eq!(back.values, frame.values, "targets travel as f32");
        for (v, (orig, got)) in frame.activations.chunks(DIM).zip(back.activations.chunks(DIM)).enumerate() {
            for (g, (a, b)) in orig.chunks(INT4_GROUP).zip(got.chunks(INT4_GROUP)).enumerate() {
                let absmax = match quant {
                    Quant::Int4 => a.iter().fold(0f32, |m, x| m.max(x.abs())),
                    _ => orig.iter().fold(0f32, |m, x| m.max(x.abs())),
                };
                let bound = match quant {
                    Quant::F16 => 1e-3 * absmax,
                    Quant::Int8 => absmax / 127.0 * 0.51 + 1e-3 * absmax,
                    Quant::Int4 => absmax / 7.0 * 0.51 + 1e-3 * absmax,
                };
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() <= bound, "{quant:?} vector {v} group {g}: {x} vs {y} (bound {bound})");
                }
            }
        }
    }
}

#[test]
fn upload_bytes_per_sample_for_smollm2_pivots() {
    let n = 64;
    let frame = sample_frame(n);
    let mut sizes = Vec::new();
    for quant in [Quant::F16, Quant::Int8, Quant::Int4] {
        let bytes = frame.encode(quant).unwrap().len() as f64 / n as f64;
        eprintln!("{quant:?}: {bytes:.0} bytes per sample (30 × 576 pivots + 8 targets)");
        sizes.push(bytes);
    }
    // Raw f32 would be 30 × 576 × 4 = 69 120 bytes.
    assert!(sizes[0] < 36_000.0 && sizes[1] < 18_500.0 && sizes[2] < 10_500.0, "{sizes:?}");
    assert!(sizes[0] > sizes[1] && sizes[1] > sizes[2]);

    // `mobillm` mode sends every token of every tapped layer, every epoch: 21 tokens (the UCI prompts' mean).
    let tokens = 21;
    let mut rng = Rng::new(3);
    let seq = Frame {
        kind: FrameKind::Sequences,
        ids: ids(8),
        layers: LAYERS,
        dim: DIM,
        activations: activations(&mut rng, 8 * tokens),
        lens: vec![tokens as u32; 8],
        labels: vec![0; 8],
        width: 2,
        values: vec![0.0; 16],
    };
    let per_sample = seq.encode(Quant::Int8).unwrap().len() as f64 / 8.0;
    eprintln!(
        "Int8 full sequence ({tokens} tokens): {per_sample:.0} bytes per sample per epoch ({:.0}× the pivot frame)",
        per_sample / sizes[1]
    );
    assert!(per_sample > 15.0 * sizes[1]);
}

#[test]
fn target_output_and_sequence_frames_round_trip() {
    let mut rng = Rng::new(2);
    for kind in [FrameKind::Targets, FrameKind::Outputs] {
        let values: Vec<f32> = (0..5 * K_OUT).map(|_| rng.unit()).collect();
        let frame = Frame::rows(kind, ids(5), K_OUT, values);
        let (back, _) = Frame::decode(&frame.encode(Quant::Int8).unwrap(), &Limits::default()).unwrap();
        assert_eq!(back, frame);
    }
    let lens = vec![3u32, 7, 1];
    let tokens: usize = lens.iter().map(|&l| l as usize).sum();
    let acts: Vec<f32> = (0..tokens * 4 * 64).map(|_| rng.unit()).collect();
    let frame = Frame {
        kind: FrameKind::Sequences,
        ids: ids(3),
        layers: 4,
        dim: 64,
        activations: acts,
        lens,
        labels: vec![1, 0, 1],
        width: 2,
        values: vec![0.5, -0.5, 1.0, 2.0, -3.0, 0.0],
    };
    let (back, _) = Frame::decode(&frame.encode(Quant::F16).unwrap(), &Limits::default()).unwrap();
    assert_eq!(
        (back.lens.clone(), back.labels.clone(), back.values.clone()),
        (frame.lens.clone(), frame.labels.clone(), frame.values.clone())
    );
    assert_eq!(back.activations.len(), frame.activations.len());
}

fn decode_err(bytes: &[u8], limits: &Limits) -> String {
    match Frame::decode(bytes, limits) {
        Err(Error::Frame(m)) => m,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

/// Rebuilds a frame with a hand-made prefix and body (for frames our encoder would never produce).
fn raw_frame(kind: u8, quant: u8, declared: u64, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&[kind, quant]);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&declared.to_le_bytes());
    out.extend_from_slice(&zstd::bulk::compress(body, 3).unwrap());
    out
}

fn body_of(frame: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(&frame[20..]).unwrap()
}

#[test]
fn malformed_frames_are_refused_with_a_reason() {
    let limits = Limits::default();
    let good = sample_frame(2).encode(Quant::Int8).unwrap();
    let body = body_of(&good);
    let n = body.len() as u64;

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(decode_err(&bad_magic, &limits).contains("magic"));
    let mut bad_version = good.clone();
    bad_version[4] = 9;
    assert!(decode_err(&bad_version, &limits).contains("version"));
    assert!(decode_err(&good[..10], &limits).contains("truncated"));
    assert!(decode_err(&good[..good.len() - 10], &limits).contains("zstd"));
    assert!(decode_err(&raw_frame(9, 1, n, &body), &limits).contains("kind"));
    assert!(decode_err(&raw_frame(1, 7, n, &body), &limits).contains("quantisation"));
    // The declared length lies, both ways.
    assert!(decode_err(&raw_frame(1, 1, n - 1, &body), &limits).contains("larger than"));
    assert!(decode_err(&raw_frame(1, 1, n + 1, &body), &limits).contains("declared"));
    // Counts that do not match the body, or the limits.
    let mut wrong_dim = body.clone();
    wrong_dim[8..12].copy_from_slice(&575u32.to_le_bytes());
    assert!(decode_err(&raw_frame(1, 1, n, &wrong_dim), &limits).contains("imply a body"));
    let mut many = body.clone();
    many[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode_err(&raw_frame(1, 1, n, &many), &limits).contains("exceeds the limit"));
    let tight = Limits { max_dim: 512, ..limits };
    assert!(decode_err(&good, &tight).contains("dimension 576"));
    // A NaN and an infinite int8 scale (f16 0x7E00 and 0x7C00) in the first vector.
    let scale_at = 20 + 2 * 16;
    for bits in [0x7E00u16, 0x7C00] {
        let mut b = body.clone();
        b[scale_at..scale_at + 2].copy_from_slice(&bits.to_le_bytes());
        assert!(decode_err(&raw_frame(1, 1, n, &b), &limits).contains("scale"));
    }
    // A NaN target.
    let mut b = body.clone();
    let last = b.len() - 4;
    b[last..].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(decode_err(&raw_frame(1, 1, n, &b), &limits).contains("NaN"));
}

#[test]
fn a_zstd_bomb_is_refused_without_inflating_it() {
    // 1 KB-scale compressed, 1 GB inflated: streamed, never held in memory here either.
    let mut bomb = Vec::new();
    zstd::stream::copy_encode(std::io::repeat(0).take(1 << 30), &mut bomb, 19).unwrap();
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    let limits = Limits::default();
    // Declaring the truth is refused by the limit before any decompression…
    assert!(decode_err(&[prefix(1 << 30), bomb.clone()].concat(), &limits).contains("exceeds the limit"));
    // …and lying about it is caught one byte past the declared length.
    let start = std::time::Instant::now();
    assert!(decode_err(&[prefix(4096), bomb].concat(), &limits).contains("larger than"));
    assert!(start.elapsed().as_secs_f64() < 5.0, "the decoder stopped early rather than inflating 1 GB");
}

fn prefix(declared: u64) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&[1, 1]);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&declared.to_le_bytes());
    out
}

#[test]
fn random_corruption_never_panics() {
    let good = sample_frame(3).encode(Quant::Int4).unwrap();
    let mut rng = Rng::new(5);
    for _ in 0..300 {
        let mut b = good.clone();
        for _ in 0..3 {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        let _ = Frame::decode(&b, &Limits::default());
    }
}

#[test]
fn the_encoder_refuses_inconsistent_or_non_finite_frames() {
    let mut f = sample_frame(2);
    f.values.pop();
    assert!(matches!(f.encode(Quant::Int8), Err(Error::InvalidInput(_))));
    let mut f = sample_frame(2);
    f.activations[5] = f32::INFINITY;
    assert!(matches!(f.encode(Quant::Int8), Err(Error::InvalidInput(_))));
}
