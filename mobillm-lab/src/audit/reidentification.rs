//! Re-identification: which candidate text a stored sample is, among `pool` candidates, from the stored
//! activations alone (nearest neighbour, norms, cross-layer products, alignment by second or higher moments) or
//! with a few samples whose text the attacker knows (inner products survive any rotation within a layer).

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::acts::Acts;
use super::attacks::{hstack, nearest_in_pool, unit_rows, Mat};
use super::report::named;
use super::{Args, Case, KNOWN_PLAINTEXT};

/// Every re-identification attack on one session: the results by name, and the details.
pub fn attack(c: &Case, args: &Args) -> Result<(Vec<(&'static str, f64)>, Value)> {
    let (view, k, truth, alignments) = (c.view, c.k, c.truth, &c.alignments);
    let acts = &view.acts;
    let (n, t) = (acts.n, acts.t);
    let (all, attacked) = (&c.all, &c.attacked);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let pools: Vec<Vec<usize>> = attacked
        .iter()
        .map(|&s| {
            let truth_text = &k.texts[truth[s]];
            let mut pool = vec![truth[s]];
            while pool.len() < args.pool.min(k.everyone.n) {
                let c = rng.random_range(0..k.everyone.n);
                if !pool.contains(&c) && k.texts[c] != *truth_text {
                    pool.push(c);
                }
            }
            pool.shuffle(&mut rng);
            pool
        })
        .collect();
    let rate = |picks: Vec<usize>| -> f64 {
        picks.iter().zip(attacked.iter()).filter(|(p, &s)| k.texts[**p] == k.texts[truth[s]]).count() as f64
            / attacked.len().max(1) as f64
    };
    let everyone = k.everyone.rows();
    let aligned_features = |x: &Acts, rows: &[usize], stored: bool| -> Mat {
        let blocks: Vec<Mat> = (0..t)
            .map(|l| {
                let a = &alignments[l];
                if stored {
                    a.stored_features(&x.layer(rows, l))
                } else {
                    a.public_features(&x.layer(rows, l))
                }
            })
            .collect();
        unit_rows(&hstack(&blocks))
    };
    let ica_features = |x: &Acts, rows: &[usize], stored: bool| -> Mat {
        let blocks: Vec<Mat> = c
            .ica
            .iter()
            .map(|(l, a)| {
                let layer = x.layer(rows, *l);
                if stored {
                    a.stored_features(&layer)
                } else {
                    a.public_features(&layer)
                }
            })
            .collect();
        unit_rows(&hstack(&blocks))
    };
    let mut reid = vec![
        (
            "activations",
            rate(nearest_in_pool(
                &unit_rows(&acts.all_layers(attacked)),
                &unit_rows(&k.everyone.all_layers(&everyone)),
                &pools,
            )),
        ),
        ("layer_norms", rate(nearest_in_pool(&acts.norms(attacked), &k.everyone.norms(&everyone), &pools))),
        (
            "cross_layer_products",
            rate(nearest_in_pool(
                &acts.cross_layer_products(attacked),
                &k.everyone.cross_layer_products(&everyone),
                &pools,
            )),
        ),
        (
            "aligned",
            rate(nearest_in_pool(
                &aligned_features(acts, attacked, true),
                &aligned_features(&k.everyone, &everyone, false),
                &pools,
            )),
        ),
    ];
    // The quick audit aligns no layer by higher moments: then there is no such attack to report.
    if !c.ica.is_empty() {
        reid.push((
            "aligned_by_higher_moments",
            rate(nearest_in_pool(
                &ica_features(acts, attacked, true),
                &ica_features(&k.everyone, &everyone, false),
                &pools,
            )),
        ));
    }
    // Known plaintext: the attacker knows which text `a` stored samples are (not among the attacked) and
    // compares inner products with them, which survive any rotation within a layer.
    let mut known = serde_json::Map::new();
    for &a in &KNOWN_PLAINTEXT {
        if attacked.len() + a > n {
            continue;
        }
        let anchors: Vec<usize> = (attacked.len()..attacked.len() + a).collect();
        let anchor_texts: Vec<usize> = anchors.iter().map(|&s| truth[s]).collect();
        let d = acts.d as f32;
        let stored: Vec<Mat> =
            (0..t).map(|l| acts.layer(attacked, l) * acts.layer(&anchors, l).transpose() / d).collect();
        let cands: Vec<Mat> = (0..t)
            .map(|l| k.everyone.layer(&everyone, l) * k.everyone.layer(&anchor_texts, l).transpose() / d)
            .collect();
        known.insert(a.to_string(), json!(rate(nearest_in_pool(&hstack(&stored), &hstack(&cands), &pools))));
    }
    // Relative spread of the stored per-layer norms (zero up to quantisation: the device sends unit RMS).
    let norm_spread = {
        let norms = acts.norms(all);
        let mean = norms.mean();
        (norms.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / norms.len().max(1) as f32).sqrt() / mean
    };
    eprintln!(
        "audit: re-identification by attack: {}",
        reid.iter().map(|(name, v)| format!("{name} {:.1}%", v * 100.0)).collect::<Vec<_>>().join(", ")
    );
    let reid_details = json!({
        "attacks": named(&reid),
        "chance": 1.0 / args.pool as f64,
        "attacked": attacked.len(),
        "known_plaintext_anchors": known,
        "layer_norm_spread": norm_spread,
    });
    Ok((reid, reid_details))
}
