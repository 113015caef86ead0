//! Token recovery: which of a text's content tokens the server can name from a stored activation (nearest
//! vocabulary rows, the logit lens, bag-of-words probes trained on public texts, aligned or not).

use std::collections::HashSet;

use anyhow::Result;
use serde_json::{json, Value};

use super::attacks::{column_means, subtract_row, top_m, Mat, Ridge};
use super::report::named;
use super::Case;

/// Every token-recovery attack on one session: the results by name, and the details.
pub fn attack(c: &Case) -> Result<(Vec<(&'static str, f64)>, Value)> {
    let (view, k, truth, alignments) = (c.view, c.k, c.truth, &c.alignments);
    let acts = &view.acts;
    let t = acts.t;
    let (all, public, attacked) = (&c.all, &c.public, &c.attacked);
    // Rank the vocabulary against a stored activation, guess as many tokens as the text has
    // (not counting the frequent ones, which need no attack).
    let vocab = k.embedding.nrows();
    let content: Vec<Vec<u32>> = attacked
        .iter()
        .map(|&s| k.tokens[truth[s]].iter().copied().filter(|x| !k.frequent.contains(x)).collect())
        .collect();
    let recovery = |scores: &Mat, ids: &dyn Fn(usize) -> Option<u32>| -> f64 {
        let (mut hits, mut total) = (0usize, 0usize);
        for (i, want) in content.iter().enumerate() {
            let row: Vec<f32> = scores.row(i).iter().copied().collect();
            let guesses: HashSet<u32> = top_m(&row, want.len(), |j| ids(j).is_some_and(|id| !k.frequent.contains(&id)))
                .into_iter()
                .filter_map(ids)
                .collect();
            hits += want.iter().filter(|x| guesses.contains(x)).count();
            total += want.len();
        }
        hits as f64 / total.max(1) as f64
    };
    let vocab_ids = |j: usize| (j < vocab).then_some(j as u32);
    let mut decode_layers: Vec<usize> = vec![0, 1, 2, 3, t / 2, t - 1];
    decode_layers.retain(|&l| l < t);
    decode_layers.dedup();
    // The bag-of-words probe's vocabulary: content tokens of the public texts.
    let mut bow: Vec<u32> =
        public.iter().flat_map(|&r| k.tokens[r].iter().copied()).filter(|x| !k.frequent.contains(x)).collect();
    bow.sort_unstable();
    bow.dedup();
    let bow_targets = Mat::from_fn(public.len(), bow.len(), |i, j| f32::from(k.tokens[public[i]].contains(&bow[j])));
    let bow_ids = |j: usize| bow.get(j).copied();
    let (mut vocab_rate, mut lens_rate, mut bow_rate, mut bow_aligned_rate) = (0f64, 0f64, 0f64, 0f64);
    for &l in &decode_layers {
        let x = acts.layer(attacked, l);
        let centred = subtract_row(&x, &column_means(&acts.layer(all, l)));
        vocab_rate = vocab_rate.max(recovery(&(&centred * k.embedding.transpose()), &vocab_ids));
        let mut lens = x.clone();
        for (j, g) in k.final_norm.iter().enumerate() {
            lens.column_mut(j).scale_mut(*g);
        }
        lens_rate = lens_rate.max(recovery(&(&lens * k.embedding.transpose()), &vocab_ids));
        let public_l = k.everyone.layer(public, l);
        let probe = Ridge::fit(&public_l, &bow_targets, 1.0);
        bow_rate = bow_rate.max(recovery(&probe.predict(&x), &bow_ids));
        let a = &alignments[l];
        let probe = Ridge::fit(&a.public_features(&public_l), &bow_targets, 1.0);
        bow_aligned_rate = bow_aligned_rate.max(recovery(&probe.predict(&a.stored_features(&x)), &bow_ids));
    }
    let text = vec![
        ("nearest_vocabulary", vocab_rate),
        ("logit_lens", lens_rate),
        ("bag_of_words_probe", bow_rate),
        ("aligned_bag_of_words_probe", bow_aligned_rate),
    ];
    let mean_tokens = content.iter().map(Vec::len).sum::<usize>() as f64 / content.len().max(1) as f64;
    let text_details = json!({
        "attacks": named(&text),
        "chance": mean_tokens / (vocab - k.frequent.len()) as f64,
        "content_tokens_per_text": mean_tokens,
        "layers": decode_layers,
        "plaintexts_in_server_files": k.texts[..k.n_train].iter().filter(|s| s.len() >= 16 && view.strings.contains(s.as_str())).count(),
    });
    Ok((text, text_details))
}
