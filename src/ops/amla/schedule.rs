//! Planning for the AMLA decode kernel: the tile configuration chosen from the device limits, and
//! the split-KV scheduler (the counterpart of FlashMLA's `get_mla_metadata`) that turns
//! `cache_seqlens` into a list of work items, one workgroup each, plus the combine jobs that merge
//! the partial results of split sequences.
//!
//! Everything here is plain host code without a GPU, so the emulation reference
//! ([`super::reference::emulate`]) can use the very same tile size and split boundaries as the
//! kernel.

use crate::error::{Error, Result};
use crate::tensor::DType;

/// Width of q and of a cache row: 512 latent dims followed by 64 rope dims.
pub const D_QK: usize = 576;
/// Width of V (the first 512 columns of a cache row) and of the output.
pub const D_V: usize = 512;
/// Invocations per decode workgroup. The P·V phase gives each invocation 4 of the 512 output
/// dims for every row of the head block, so this is fixed at 512 / 4.
pub const WORKGROUP: u32 = 128;
/// Largest head block: 16 rows x 4 dims of O per invocation (64 registers) is what a SIMT
/// invocation can hold next to its score accumulators.
pub const MAX_HEAD_BLOCK: u32 = 16;
/// Rows per invocation in the score phase (the register tile over heads).
const MAX_ROWS_PER_THREAD: u32 = 8;
/// Dims of q and k handled together (one vec4 of q, 8 or 16 bytes of k).
const QUAD: u32 = 4;
/// Quads in a 576-wide row.
pub const QUADS: u32 = (D_QK as u32) / QUAD;
/// Words of padding after each cached key row in workgroup memory: a row stride of 8 (mod 32)
/// words keeps the score phase's reads of neighbouring keys on different banks.
const KV_ROW_PAD_WORDS: u32 = 8;
/// Key tile sizes tried, largest first.
const TILE_KEYS: [u32; 3] = [32, 16, 8];

/// Bytes per value in the kernel's key tile: the cache's own for a float cache, 4 for a packed
/// 8-bit cache (decoded to f32 while the tile is loaded).
pub fn tile_value_bytes(kv_dtype: DType) -> usize {
    if kv_dtype.size() == 1 {
        4
    } else {
        kv_dtype.size()
    }
}

/// The decode kernel's tile configuration (all of it becomes WGSL override constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TileConfig {
    /// Query rows (query token x head) per workgroup: the head block.
    pub head_block: u32,
    /// Rows per invocation in the score phase.
    pub rows_per_thread: u32,
    /// Keys per KV tile: the unit of the online softmax (one max update per tile).
    pub tile_keys: u32,
    /// Keys per invocation in the score phase.
    pub keys_per_thread: u32,
    /// Groups splitting the 576-dim dot products in the score phase.
    pub d_groups: u32,
    /// Row stride of the KV tile in workgroup memory, in 8-byte words.
    pub kv_stride: u32,
    /// Workgroup memory the kernel declares, in bytes.
    pub workgroup_bytes: u32,
}

impl TileConfig {
    /// The configuration for `head_block` rows and `tile_keys` keys per tile with a cache of
    /// `kv_dtype`; an error if the combination does not tile the workgroup.
    pub fn new(head_block: u32, tile_keys: u32, kv_dtype: DType) -> Result<Self> {
        if !head_block.is_power_of_two() || head_block > MAX_HEAD_BLOCK {
            return Err(Error::invalid(
                "amla",
                "head block",
                format!("{head_block} (a power of two up to {MAX_HEAD_BLOCK})"),
            ));
        }
        if !TILE_KEYS.contains(&tile_keys) {
            return Err(Error::invalid(
                "amla",
                "key tile",
                format!("{tile_keys} (one of {TILE_KEYS:?})"),
            ));
        }
        let rows_per_thread = head_block.min(MAX_ROWS_PER_THREAD);
        let row_groups = head_block / rows_per_thread;
        // Two keys per invocation halve the q loads; with too few (row group, key group) pairs
        // the d-split would exceed 16 groups, so fall back to one.
        let keys_per_thread = if row_groups * tile_keys / 2 >= 8 {
            2
        } else {
            1
        };
        let pairs = row_groups * tile_keys / keys_per_thread;
        let d_groups = WORKGROUP / pairs;
        debug_assert!(d_groups * pairs == WORKGROUP && QUADS.is_multiple_of(d_groups));
        let words_per_key = (D_QK * tile_value_bytes(kv_dtype) / 4) as u32;
        let kv_stride_words = words_per_key + KV_ROW_PAD_WORDS;
        // kv tile + d-split partial scores (reused for P) + scores + three per-row words + one
        // per-key word (the non-finite flags).
        let words = tile_keys * kv_stride_words
            + d_groups * head_block * tile_keys
            + head_block * tile_keys
            + 3 * head_block
            + tile_keys;
        Ok(TileConfig {
            head_block,
            rows_per_thread,
            tile_keys,
            keys_per_thread,
            d_groups,
            kv_stride: kv_stride_words / 2,
            workgroup_bytes: 4 * words,
        })
    }

    /// The largest key tile whose workgroup memory fits `max_workgroup_bytes`, for a head block
    /// covering `rows` query rows (s_q x h_q) of a sequence.
    pub fn choose(rows: usize, kv_dtype: DType, max_workgroup_bytes: u32) -> Result<Self> {
        let head_block = (rows.max(1).next_power_of_two() as u32).min(MAX_HEAD_BLOCK);
        let mut smallest = None;
        for keys in TILE_KEYS {
            let config = TileConfig::new(head_block, keys, kv_dtype)?;
            if config.workgroup_bytes <= max_workgroup_bytes {
                return Ok(config);
            }
            smallest = Some(config);
        }
        let need = smallest.map_or(0, |c| c.workgroup_bytes);
        Err(Error::Limit {
            what: format!("amla workgroup memory (head block {head_block}, {kv_dtype} cache)"),
            need: need as u64,
            max: max_workgroup_bytes as u64,
        })
    }

    /// An error unless this is exactly what [`TileConfig::new`] gives for its head block, key
    /// tile and `kv_dtype`: the fields are public, and the kernel's register and workgroup arrays
    /// are sized for those configurations only.
    pub(crate) fn check(&self, kv_dtype: DType) -> Result<()> {
        if TileConfig::new(self.head_block, self.tile_keys, kv_dtype)? != *self {
            return Err(Error::invalid(
                "amla",
                "tiles",
                format!(
                    "{self:?} is not what TileConfig::new gives for head block {} and {}-key \
                     tiles with a {kv_dtype} cache",
                    self.head_block, self.tile_keys
                ),
            ));
        }
        Ok(())
    }

    /// Head blocks per sequence for `rows` query rows.
    pub fn row_blocks(&self, rows: usize) -> usize {
        rows.div_ceil(self.head_block as usize)
    }
}

/// How the scheduler splits sequences across workgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Balance the work over about this many workgroups (FlashMLA's metadata heuristic): long
    /// sequences are split, short ones are not. About 4 per SM/CU suits the decode kernel.
    Auto { target_workgroups: u32 },
    /// One workgroup per (sequence, head block); no combine pass.
    Off,
    /// Split every sequence into chunks of this many keys (rounded up to whole tiles): for tests
    /// and tuning.
    Chunk { keys: u32 },
}

/// Default `Split::Auto` target: 4 workgroups for each of the 132 SMs of an H100, rounded.
pub const DEFAULT_TARGET_WORKGROUPS: u32 = 512;

impl Default for Split {
    fn default() -> Self {
        Split::Auto {
            target_workgroups: DEFAULT_TARGET_WORKGROUPS,
        }
    }
}

/// Marks a work item that writes the final output (its sequence is not split).
pub const FINAL_OUTPUT: u32 = u32::MAX;
/// Tiles of fixed cost charged per work item (prologue, epilogue, partial write).
const ITEM_OVERHEAD_TILES: usize = 1;
/// Fewest tiles a split may get under `Split::Auto`.
const MIN_TILES_PER_SPLIT: usize = 2;

/// One workgroup's work: a key range of one sequence for one head block. Mirrored by the
/// kernel, which reads it as 8 words from the metadata buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct WorkItem {
    /// Sequence (batch index).
    pub seq: u32,
    /// Head block: rows row_block * head_block .. of the sequence's s_q x h_q rows.
    pub row_block: u32,
    /// Keys key_begin..key_end of the sequence (key_begin is a multiple of the tile size).
    pub key_begin: u32,
    pub key_end: u32,
    /// Partial-result slot, or [`FINAL_OUTPUT`].
    pub partial: u32,
    pub _pad: [u32; 3],
}

/// One combine job: merge `splits` consecutive partial slots from `first_partial` into the
/// output rows of (seq, row_block).
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct CombineItem {
    pub seq: u32,
    pub row_block: u32,
    pub first_partial: u32,
    pub splits: u32,
}

/// The scheduler's answer for one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkPlan {
    /// Work items, largest first (so the longest workgroups start first).
    pub items: Vec<WorkItem>,
    /// Combine jobs, one per (split sequence, head block).
    pub combines: Vec<CombineItem>,
    /// Partial slots used.
    pub partial_slots: u32,
    /// The key ranges of each sequence's splits, in order (one empty range for length 0).
    pub ranges: Vec<Vec<(u32, u32)>>,
}

/// The most partial slots any batch of `batch` sequences (each at most `max_keys` long) can
/// need under `split`: what the workspace is sized for.
pub fn max_partial_slots(
    split: Split,
    batch: usize,
    row_blocks: usize,
    max_keys: usize,
    tile_keys: u32,
) -> u64 {
    let (batch, row_blocks) = (batch as u64, row_blocks as u64);
    match split {
        Split::Off => 0,
        Split::Chunk { keys } => {
            let chunk = chunk_keys(keys, tile_keys);
            let splits = (max_keys as u64).div_ceil(chunk);
            if splits <= 1 {
                0
            } else {
                batch * row_blocks * splits
            }
        }
        // Each split sequence gets at most tiles / per_item + 1 splits with
        // per_item >= total / target, so the sum over the batch is at most target / row_blocks
        // + batch per head block.
        Split::Auto { target_workgroups } => target_workgroups as u64 + batch * row_blocks,
    }
}

/// `keys` rounded up to whole tiles, in u64: near u32::MAX the rounding passes 2^32.
fn chunk_keys(keys: u32, tile_keys: u32) -> u64 {
    let tile_keys = u64::from(tile_keys.max(1));
    u64::from(keys.max(1)).div_ceil(tile_keys) * tile_keys
}

/// Split the batch: `seqlens` (validated, >= 0) in keys, `row_blocks` head blocks per sequence.
pub fn plan_work(
    seqlens: &[usize],
    row_blocks: usize,
    tile_keys: u32,
    split: Split,
) -> Result<WorkPlan> {
    if tile_keys == 0 {
        return Err(Error::invalid("amla", "key tile", "0 keys"));
    }
    let tile = tile_keys as usize;
    let tiles: Vec<usize> = seqlens.iter().map(|&l| l.div_ceil(tile)).collect();
    let splits: Vec<usize> = match split {
        Split::Off => vec![1; seqlens.len()],
        Split::Chunk { keys } => {
            let chunk = (chunk_keys(keys, tile_keys) / tile as u64) as usize;
            tiles.iter().map(|&t| t.div_ceil(chunk).max(1)).collect()
        }
        Split::Auto { target_workgroups } => {
            if target_workgroups == 0 {
                return Err(Error::invalid(
                    "amla",
                    "split target",
                    "target_workgroups must be at least 1",
                ));
            }
            let total: usize = tiles
                .iter()
                .map(|t| (t + ITEM_OVERHEAD_TILES) * row_blocks)
                .sum();
            let per_item = total
                .div_ceil(target_workgroups as usize)
                .max(MIN_TILES_PER_SPLIT);
            tiles.iter().map(|&t| t.div_ceil(per_item).max(1)).collect()
        }
    };
    let mut ranges = Vec::with_capacity(seqlens.len());
    let mut chunks = Vec::new();
    let mut combines = Vec::new();
    let mut next_slot: u64 = 0;
    for (seq, ((&len, &t), &n)) in seqlens.iter().zip(&tiles).zip(&splits).enumerate() {
        // Even split in whole tiles; the last split may be shorter.
        let per_split = t.div_ceil(n).max(1);
        let n = t.div_ceil(per_split).max(1);
        let mut seq_ranges = Vec::with_capacity(n);
        for s in 0..n {
            let begin = (s * per_split * tile).min(len);
            let end = ((s + 1) * per_split * tile).min(len);
            seq_ranges.push((begin as u32, end as u32));
        }
        let first_slot = if n > 1 {
            let first = next_slot;
            next_slot += (n * row_blocks) as u64;
            for rb in 0..row_blocks {
                combines.push(CombineItem {
                    seq: seq as u32,
                    row_block: rb as u32,
                    first_partial: (first + (rb * n) as u64) as u32,
                    splits: n as u32,
                });
            }
            Some(first)
        } else {
            None
        };
        for (s, &(begin, end)) in seq_ranges.iter().enumerate() {
            chunks.push((seq, s, n, begin, end, first_slot));
        }
        ranges.push(seq_ranges);
    }
    if next_slot > u32::MAX as u64 / 2 {
        return Err(Error::invalid(
            "amla",
            "split",
            format!("{next_slot} partial slots"),
        ));
    }
    // Longest chunks first; the head blocks of one chunk stay adjacent so that they read the
    // same pages at the same time.
    chunks.sort_by_key(|&(seq, s, _, begin, end, _)| (std::cmp::Reverse(end - begin), seq, s));
    let mut items = Vec::with_capacity(chunks.len() * row_blocks);
    for (seq, s, n, begin, end, first_slot) in chunks {
        for rb in 0..row_blocks {
            items.push(WorkItem {
                seq: seq as u32,
                row_block: rb as u32,
                key_begin: begin,
                key_end: end,
                partial: first_slot.map_or(FINAL_OUTPUT, |f| (f as usize + rb * n + s) as u32),
                _pad: [0; 3],
            });
        }
    }
    Ok(WorkPlan {
        items,
        combines,
        partial_slots: next_slot as u32,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_configs_tile_the_workgroup_and_fit_the_target_limits() {
        for kv in [DType::F32, DType::F16, DType::BF16, DType::U8] {
            for hb in [1, 2, 4, 8, 16] {
                for tn in TILE_KEYS {
                    let c = TileConfig::new(hb, tn, kv).unwrap();
                    let pairs = (hb / c.rows_per_thread) * (tn / c.keys_per_thread);
                    assert_eq!(pairs * c.d_groups, WORKGROUP, "{hb} {tn}");
                    assert_eq!(QUADS % c.d_groups, 0);
                    assert!(c.d_groups <= 16);
                }
            }
        }
        // The H100 (48 KiB) gets 32-key tiles for a 16-bit cache, lavapipe (32 KiB) 16.
        let h100 = TileConfig::choose(16, DType::BF16, 48 << 10).unwrap();
        assert_eq!((h100.head_block, h100.tile_keys), (16, 32));
        assert!(h100.workgroup_bytes <= 48 << 10);
        let lavapipe = TileConfig::choose(128, DType::BF16, 32 << 10).unwrap();
        assert_eq!((lavapipe.head_block, lavapipe.tile_keys), (16, 16));
        assert_eq!(
            TileConfig::choose(1, DType::F32, 32 << 10)
                .unwrap()
                .head_block,
            1
        );
        assert!(matches!(
            TileConfig::choose(16, DType::F32, 8 << 10),
            Err(Error::Limit { .. })
        ));
        assert!(TileConfig::new(3, 16, DType::F16).is_err());
        assert!(TileConfig::new(16, 64, DType::F16).is_err());
    }

    fn covers(plan: &WorkPlan, seqlens: &[usize], row_blocks: usize, tile: u32) {
        for (seq, &len) in seqlens.iter().enumerate() {
            let r = &plan.ranges[seq];
            assert_eq!(r.first().unwrap().0, 0);
            assert_eq!(r.last().unwrap().1 as usize, len);
            for w in r.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            for &(b, e) in r {
                assert_eq!(b % tile, 0);
                assert!(b < e || len == 0);
            }
            for rb in 0..row_blocks {
                let mine: Vec<_> = plan
                    .items
                    .iter()
                    .filter(|i| i.seq as usize == seq && i.row_block as usize == rb)
                    .collect();
                assert_eq!(mine.len(), r.len());
                if r.len() == 1 {
                    assert_eq!(mine[0].partial, FINAL_OUTPUT);
                } else {
                    let c = plan
                        .combines
                        .iter()
                        .find(|c| c.seq as usize == seq && c.row_block as usize == rb)
                        .unwrap();
                    assert_eq!(c.splits as usize, r.len());
                    for item in mine {
                        let s = r.iter().position(|&(b, _)| b == item.key_begin).unwrap();
                        assert_eq!(item.partial, c.first_partial + s as u32);
                    }
                }
            }
        }
        let slots: u32 = plan.combines.iter().map(|c| c.splits).sum();
        assert_eq!(slots, plan.partial_slots);
    }

    #[test]
    fn off_gives_one_item_per_sequence_and_head_block() {
        let seqlens = [0, 1, 100, 4096];
        let plan = plan_work(&seqlens, 2, 16, Split::Off).unwrap();
        assert_eq!(plan.items.len(), 8);
        assert!(plan.combines.is_empty());
        covers(&plan, &seqlens, 2, 16);
        // Largest first.
        assert_eq!(plan.items[0].key_end, 4096);
    }

    #[test]
    fn chunks_split_long_sequences_on_tile_boundaries() {
        let seqlens = [0, 1, 33, 100, 257];
        let plan = plan_work(&seqlens, 3, 16, Split::Chunk { keys: 40 }).unwrap();
        // 40 keys round up to 48 (3 tiles).
        assert_eq!(plan.ranges[3], vec![(0, 48), (48, 96), (96, 100)]);
        assert_eq!(plan.ranges[1], vec![(0, 1)]);
        assert_eq!(plan.ranges[0], vec![(0, 0)]);
        covers(&plan, &seqlens, 3, 16);
        let bound = max_partial_slots(Split::Chunk { keys: 40 }, 5, 3, 257, 16);
        assert!(plan.partial_slots as u64 <= bound);
    }

    #[test]
    fn auto_splits_long_sequences_and_keeps_short_ones_whole() {
        // One long sequence among short ones: the long one is split, the short ones are not.
        let mut seqlens = vec![64; 31];
        seqlens.push(16384);
        let split = Split::Auto {
            target_workgroups: 128,
        };
        let plan = plan_work(&seqlens, 1, 32, split).unwrap();
        covers(&plan, &seqlens, 1, 32);
        assert!(plan.ranges[31].len() > 8, "{:?}", plan.ranges[31].len());
        assert!(plan.ranges[..31].iter().all(|r| r.len() == 1));
        assert!(plan.items.len() <= 128 + seqlens.len());
        assert!(plan.partial_slots as u64 <= max_partial_slots(split, 32, 1, 16384, 32));
        // Balanced: no item is more than twice the average useful work.
        let longest = plan.items.iter().map(|i| i.key_end - i.key_begin).max();
        let total: usize = seqlens.iter().sum();
        assert!(longest.unwrap() as usize <= 2 * total / plan.items.len() + 64);
        // A batch that already fills the target is left unsplit.
        let full = plan_work(&[4096; 256], 4, 32, split).unwrap();
        assert!(full.combines.is_empty());
        assert!(
            plan_work(
                &[1],
                1,
                32,
                Split::Auto {
                    target_workgroups: 0
                }
            )
            .is_err()
        );
        // A zero-key tile is an error, not a division by zero.
        assert!(plan_work(&[5], 1, 0, Split::Off).is_err());
        assert_eq!(max_partial_slots(Split::Chunk { keys: 8 }, 1, 1, 64, 0), 8);
    }

    #[test]
    fn auto_bound_holds_for_many_batches() {
        let split = Split::Auto {
            target_workgroups: 64,
        };
        let mut x: u64 = 12345;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = 1 + (x >> 60) as usize;
            let row_blocks = 1 + ((x >> 40) % 8) as usize;
            let seqlens: Vec<usize> = (0..b).map(|i| ((x >> (i % 32)) % 20000) as usize).collect();
            let plan = plan_work(&seqlens, row_blocks, 16, split).unwrap();
            covers(&plan, &seqlens, row_blocks, 16);
            assert!(
                plan.partial_slots as u64 <= max_partial_slots(split, b, row_blocks, 20000, 16)
            );
        }
    }
}
