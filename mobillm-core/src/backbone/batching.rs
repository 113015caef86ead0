//! How prompts are grouped into forward batches, for every caller of the forward (the fine-tune, held-out
//! scoring, prediction, the benchmarks): prompts sorted by length so little work goes to padding, at most
//! `max_examples` per batch, and at most `max_tokens` padded tokens, so the longest prompts go in smaller batches
//! and the forward's working memory stays flat (the cost per token is the same).

use candle_core::{Tensor, WithDType};

use crate::error::Result;
use crate::task::Task;
use crate::tokenizer::Tokenizer;

/// Padded tokens per forward batch by default.
pub const BATCH_TOKENS: usize = 640;

/// Encoded prompts and the batches to forward them in.
#[derive(Debug, Clone)]
pub struct Batches {
    /// Token ids of every prompt, in the caller's order.
    pub encoded: Vec<Vec<u32>>,
    /// Indices into `encoded`, one list per forward batch, shortest prompts first.
    pub groups: Vec<Vec<usize>>,
}

impl Batches {
    /// Encodes `texts` with the task's template and plans their batches.
    pub fn plan(
        task: &Task,
        tokenizer: &Tokenizer,
        texts: &[&str],
        max_examples: usize,
        max_tokens: usize,
    ) -> Result<Batches> {
        let encoded = texts.iter().map(|t| task.encode(tokenizer, t)).collect::<Result<Vec<_>>>()?;
        let groups = group_by_length(&encoded, max_examples, max_tokens);
        Ok(Batches { encoded, groups })
    }

    /// The batches of `subset` (indices into `encoded`) planned on their own, in the same indices.
    pub fn groups_of(&self, subset: &[usize], max_examples: usize, max_tokens: usize) -> Vec<Vec<usize>> {
        let encoded: Vec<Vec<u32>> = subset.iter().map(|&i| self.encoded[i].clone()).collect();
        let groups = group_by_length(&encoded, max_examples, max_tokens);
        groups.into_iter().map(|g| g.into_iter().map(|j| subset[j]).collect()).collect()
    }

    /// The token ids of one batch.
    pub fn batch(&self, group: &[usize]) -> Vec<Vec<u32>> {
        group.iter().map(|&i| self.encoded[i].clone()).collect()
    }
}

/// Groups prompts (by index) into batches: sorted by length, at most `max_examples` each, and at most
/// `max_tokens` padded tokens each unless a single prompt is longer.
pub fn group_by_length(encoded: &[Vec<u32>], max_examples: usize, max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded[i].len());
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in order {
        // Sorted ascending, so the newcomer is the batch's longest prompt.
        let fits = groups
            .last()
            .is_some_and(|g| g.len() < max_examples.max(1) && (g.len() + 1) * encoded[i].len() <= max_tokens);
        match groups.last_mut() {
            Some(g) if fits => g.push(i),
            _ => groups.push(vec![i]),
        }
    }
    groups
}

/// Copies row `j` of a batch's output (`row` values each, converted to `T`) to row `group[j]` of `out`: a forward
/// batch's results back in the caller's order.
pub fn scatter_rows<T: WithDType>(batch: &Tensor, group: &[usize], row: usize, out: &mut [T]) -> Result<()> {
    let values = batch.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()?;
    for (j, &i) in group.iter().enumerate() {
        out[i * row..(i + 1) * row].copy_from_slice(&values[j * row..(j + 1) * row]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_sorted_capped_in_examples_and_padded_tokens() {
        let lens = [5usize, 1, 9, 3, 3, 7, 2, 100];
        let encoded: Vec<Vec<u32>> = lens.iter().map(|&n| vec![0; n]).collect();
        let groups = group_by_length(&encoded, 3, 16);
        let flat: Vec<usize> = groups.concat();
        let mut sorted = flat.clone();
        sorted.sort_by_key(|&i| lens[i]);
        assert_eq!(flat, sorted, "shortest first, every prompt once");
        assert_eq!(flat.len(), lens.len());
        for g in &groups {
            let longest = g.iter().map(|&i| lens[i]).max().unwrap();
            assert!(g.len() <= 3);
            assert!(g.len() * longest <= 16 || g.len() == 1, "{g:?} pads to {}", g.len() * longest);
        }
        assert_eq!(groups.last().unwrap(), &vec![7], "a prompt longer than the budget goes alone");
    }
}
