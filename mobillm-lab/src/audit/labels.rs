//! Attacks on the labels: which stored samples share one (clustering the targets or the activations), and which
//! label each is (plain reads of the targets, probes trained on public look-alike data, aligned or not).

use anyhow::Result;
use serde_json::{json, Value};

use super::attacks::{
    accuracy, agreement_naming, argmax_rows, clustering_accuracy, cross_fitted_ridge, independent_scores, kmeans,
    one_hot, probe_cv_accuracy, unit_rows, Mat, Ridge,
};
use super::report::named as named_results;
use super::Case;

/// The label attacks that read only the stored activations, no target: all a server learns about labels when
/// nothing label-dependent is sent.
pub const FROM_ACTIVATIONS: [&str; 5] =
    ["activations_clustered", "last_layer_clustered", "public_probe", "aligned_probe", "backbone_zero_shot_readout"];
/// The label attacks that use no public look-alike data (their clusters are named by the true labels: upper bounds
/// on what the partition gives away).
pub const WITHOUT_PUBLIC_DATA: [&str; 6] = [
    "targets_clustered",
    "targets_predicted_out_of_fold",
    "targets_unmixed_most_learnable",
    "activations_clustered",
    "last_layer_clustered",
    "targets_read_plainly",
];

/// Every label attack on one session: the results by name, and the details.
pub fn attack(c: &Case) -> Result<(Vec<(&'static str, f64)>, Value)> {
    let (view, k, alignments) = (c.view, c.k, &c.alignments);
    let acts = &view.acts;
    let (t, kl) = (acts.t, k.n_labels);
    let (all, y, public) = (&c.all, &c.y, &c.public);
    let public_y = k.public_labels();
    let target_clusters = kmeans(&view.targets, kl, 11);
    let probe_layer = (0..t)
        .map(|l| (l, probe_cv_accuracy(&k.everyone.layer(public, l), public_y, kl)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(t - 1, |(l, _)| l);
    let probe = Ridge::fit(&k.everyone.layer(public, probe_layer), &one_hot(public_y, kl), 0.1);
    let aligned_layer = (0..t)
        .map(|l| (l, probe_cv_accuracy(&alignments[l].public_features(&k.everyone.layer(public, l)), public_y, kl)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(t - 1, |(l, _)| l);
    let al = &alignments[aligned_layer];
    let aligned_probe =
        Ridge::fit(&al.public_features(&k.everyone.layer(public, aligned_layer)), &one_hot(public_y, kl), 0.1);
    let aligned_predictions = argmax_rows(&aligned_probe.predict(&al.stored_features(&acts.layer(all, aligned_layer))));
    let readout = Ridge::fit(&k.everyone.layer(public, t - 1), &k.public_logits, 1e-3);
    let readout_agreement =
        accuracy(&argmax_rows(&readout.predict(&k.everyone.layer(public, t - 1))), &argmax_rows(&k.public_logits));
    let named_clusters = {
        let names = agreement_naming(&target_clusters, &aligned_predictions, kl);
        target_clusters.iter().map(|&c| names[c]).collect::<Vec<_>>()
    };
    // Against decoys: the targets unmixed into independent components, each split into K clusters, is a list of
    // candidate partitions with the real one among them.
    let candidates = unmixed_candidates(&view.targets, kl);
    let candidate_labels: Vec<Vec<u32>> = candidates.iter().map(|c| c.iter().map(|&v| v as u32).collect()).collect();
    let candidate_targets: Vec<Mat> = candidate_labels.iter().map(|c| one_hot(c, kl)).collect();
    // The server's own model of its targets (and of each candidate), scored out of fold: what it generalizes
    // survives label noise; how well it generalizes tells a partition the data supports from an arbitrary one.
    let mut fitted = {
        let ys: Vec<&Mat> = std::iter::once(&view.targets).chain(&candidate_targets).collect();
        cross_fitted_ridge(&acts.all_layers(all), &ys, &[0.01, 0.1, 1.0, 10.0])
    };
    let model_targets = fitted.remove(0);
    let learnability: Vec<f64> =
        fitted.iter().zip(&candidate_labels).map(|(p, c)| accuracy(&argmax_rows(p), c)).collect();
    let most_learnable = argmax(&learnability);
    // The public probe names each candidate's clusters and says how well the candidate agrees with a real task.
    let named: Vec<(f64, Vec<u32>)> = candidates
        .iter()
        .map(|c| {
            let names = agreement_naming(c, &aligned_predictions, kl);
            let labelled: Vec<u32> = c.iter().map(|&v| names[v]).collect();
            (accuracy(&labelled, &aligned_predictions), labelled)
        })
        .collect();
    let most_agreeing = argmax(&named.iter().map(|(a, _)| *a).collect::<Vec<_>>());
    let labels = vec![
        ("targets_clustered", clustering_accuracy(&target_clusters, y, kl, kl)),
        ("targets_predicted_out_of_fold", clustering_accuracy(&kmeans(&model_targets, kl, 14), y, kl, kl)),
        ("activations_clustered", clustering_accuracy(&kmeans(&unit_rows(&acts.all_layers(all)), kl, 12), y, kl, kl)),
        ("last_layer_clustered", clustering_accuracy(&kmeans(&acts.layer(all, t - 1), kl, 13), y, kl, kl)),
        ("targets_unmixed_most_learnable", clustering_accuracy(&candidates[most_learnable], y, kl, kl)),
        ("targets_unmixed_named_by_public_probe", accuracy(&named[most_agreeing].1, y)),
        ("targets_read_plainly", accuracy(&argmax_rows(&view.targets.columns(0, kl).into_owned()), y)),
        ("public_probe", accuracy(&argmax_rows(&probe.predict(&acts.layer(all, probe_layer))), y)),
        ("aligned_probe", accuracy(&aligned_predictions, y)),
        ("backbone_zero_shot_readout", accuracy(&argmax_rows(&readout.predict(&acts.layer(all, t - 1))), y)),
    ];
    // The number of labels, as far as the targets show it: Q·[Δ; 0] spans only K − 1 of the K' dimensions (Δ sums
    // to zero), but the server's own outputs, added from round 2 on, spread further (AdamW steps per coordinate).
    let target_rank = {
        let sv = view.targets.clone().cast::<f64>().singular_values();
        let top = sv.max();
        sv.iter().filter(|&&v| v > 1e-3 * top).count()
    };
    let label_details = json!({
        "label_count_from_target_rank": target_rank + 1,
        "attacks": named_results(&labels),
        "unmixed_candidates": {
            "learnability": learnability,
            "agreement_with_public_probe": named.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            "accuracy": candidates.iter().map(|c| clustering_accuracy(c, y, kl, kl)).collect::<Vec<_>>(),
        },
        "target_clusters_named_by_aligned_probe": accuracy(&named_clusters, y),
        "probe_layer": probe_layer,
        "aligned_probe_layer": aligned_layer,
        "zero_shot_readout_agreement_on_public": readout_agreement,
    });
    Ok((labels, label_details))
}

/// Components unmixed from the targets (FastICA, as many as the targets have columns), each split into `k` clusters
/// by k-means: the partitions of the samples the targets carry.
fn unmixed_candidates(targets: &Mat, k: usize) -> Vec<Vec<usize>> {
    let scores = independent_scores(targets, targets.ncols(), 21);
    (0..scores.ncols()).map(|c| kmeans(&scores.columns(c, 1).into_owned(), k, 30 + c as u64)).collect()
}

fn argmax(values: &[f64]) -> usize {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}
