//! Inputs for tests, `fusedops check` and the benchmarks: random q and cache rows in a shuffled
//! paged layout. Every cache slot that no sequence uses (past its length, and whole unused
//! pages) holds NaN, and block-table entries past a sequence's pages hold -1 or ids of NaN
//! pages, so that any out-of-range read poisons the output. An 8-bit cache is the float one
//! quantized by [`quantize_cache`] (its NaN rows get NaN codes and scales).

use half::{bf16, f16};

use super::{D_QK, D_V, KvFormat, quantize_cache};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

/// What the cache and q hold.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pattern {
    /// Add a ramp to the scores: key k scores `k * ramp` (log2 units, at the default softmax
    /// scale) above key 0, through the last rope dim, so the running max keeps rising. Large
    /// ramps make AMLA's exponent step hit the -30 clamp.
    pub ramp_log2_per_key: f32,
    /// Overwrite one V column in the first keys of every sequence.
    pub column: Option<ColumnFill>,
}

/// V column `column` (< 512) holds `value` in the first `keys` keys of each sequence. With 0
/// and later keys random, O is exactly 0 there for a while and then not (AMLA's exponent add must
/// leave the zero alone); with a denormal such as 1e-39 in every key, O is denormal there (the
/// add wraps its exponent and the 1e10 guard has to zero it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColumnFill {
    pub column: usize,
    pub value: f32,
    pub keys: usize,
}

/// Shapes and layout of generated inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    pub seqlens: Vec<usize>,
    pub s_q: usize,
    pub h_q: usize,
    pub page_size: usize,
    pub q_dtype: DType,
    /// f32, f16 or bf16; u8 for an 8-bit cache (see `kv_format`).
    pub kv_dtype: DType,
    /// `Fp8` or `Int8`: the cache is generated in f32 and quantized (`kv_dtype` u8).
    pub kv_format: KvFormat,
    /// Pages that no sequence uses (NaN-filled).
    pub spare_blocks: usize,
    /// Block-table columns past the longest sequence's pages.
    pub spare_columns: usize,
    pub pattern: Pattern,
}

impl InputSpec {
    /// q and cache in `dtype`, two spare pages and one spare block-table column.
    pub fn new(seqlens: &[usize], s_q: usize, h_q: usize, page_size: usize, dtype: DType) -> Self {
        InputSpec {
            seqlens: seqlens.to_vec(),
            s_q,
            h_q,
            page_size,
            q_dtype: dtype,
            kv_dtype: dtype,
            kv_format: KvFormat::Float,
            spare_blocks: 2,
            spare_columns: 1,
            pattern: Pattern::default(),
        }
    }

    /// The same spec with an 8-bit cache of `format` (`Fp8` or `Int8`).
    pub fn quantized(mut self, format: KvFormat) -> Self {
        self.kv_dtype = DType::U8;
        self.kv_format = format;
        self
    }

    /// The cache's name in case labels: its dtype, or fp8 / int8.
    pub fn kv_label(&self) -> &'static str {
        match self.kv_format {
            KvFormat::Float => self.kv_dtype.name(),
            f => f.name(),
        }
    }

    /// The pages a sequence of `len` keys uses.
    pub fn pages(&self, len: usize) -> usize {
        len.div_ceil(self.page_size)
    }
}

/// Generated input tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct AmlaInputs {
    pub q: Tensor,
    pub kv_cache: Tensor,
    pub block_table: Tensor,
    pub cache_seqlens: Tensor,
}

/// SplitMix64: a small seeded generator, so that the library needs no `rand`.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn float_tensor(shape: &[usize], values: Vec<f32>, dtype: DType) -> Result<Tensor> {
    let data = match dtype {
        DType::F32 => TensorData::F32(values),
        DType::F16 => TensorData::F16(values.into_iter().map(f16::from_f32).collect()),
        DType::BF16 => TensorData::BF16(values.into_iter().map(bf16::from_f32).collect()),
        other => {
            return Err(Error::unsupported(
                "amla",
                format!("input dtype {other} (expected f32, f16 or bf16)"),
            ));
        }
    };
    Tensor::new(shape, data)
}

impl AmlaInputs {
    /// Inputs for `spec`, reproducible from `seed`.
    pub fn generate(spec: &InputSpec, seed: u64) -> Result<Self> {
        if spec.page_size == 0 {
            return Err(Error::invalid("amla", "page size", "0"));
        }
        let mut rng = SplitMix::new(seed);
        let b = spec.seqlens.len();
        let used: usize = spec.seqlens.iter().map(|&l| spec.pages(l)).sum();
        let num_blocks = (used + spec.spare_blocks).max(1);
        let width = spec
            .seqlens
            .iter()
            .map(|&l| spec.pages(l))
            .max()
            .unwrap_or(0)
            + spec.spare_columns;
        let width = width.max(1);
        // Shuffled pages: sequences get the first `used` of a permutation, the rest stay spare.
        let mut ids: Vec<usize> = (0..num_blocks).collect();
        for i in (1..num_blocks).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let spare: Vec<usize> = ids[used..].to_vec();
        let mut table = vec![-1i32; b * width];
        let mut next = 0;
        for (s, &len) in spec.seqlens.iter().enumerate() {
            for p in 0..width {
                table[s * width + p] = if p < spec.pages(len) {
                    next += 1;
                    ids[next - 1] as i32
                } else if !spare.is_empty() && rng.below(2) == 0 {
                    spare[rng.below(spare.len())] as i32
                } else {
                    -1
                };
            }
        }
        let page = spec.page_size;
        let mut cache = vec![f32::NAN; num_blocks * page * D_QK];
        // Key k of a sequence adds k * ramp (log2 units) to every row's score through dim 575,
        // where q holds 1: k * ramp * ln 2 / scale at the default scale 1/sqrt(576).
        let ramp =
            spec.pattern.ramp_log2_per_key as f64 * std::f64::consts::LN_2 * (D_QK as f64).sqrt();
        for (s, &len) in spec.seqlens.iter().enumerate() {
            for k in 0..len {
                let block = table[s * width + k / page] as usize;
                let row = &mut cache[(block * page + k % page) * D_QK..][..D_QK];
                for x in row.iter_mut() {
                    *x = rng.normal();
                }
                if ramp != 0.0 {
                    row[D_QK - 1] = (k as f64 * ramp) as f32;
                }
                if let Some(fill) = spec.pattern.column {
                    if fill.column < D_V && k < fill.keys {
                        row[fill.column] = fill.value;
                    }
                }
            }
        }
        let rows = b * spec.s_q * spec.h_q;
        let mut q: Vec<f32> = (0..rows * D_QK).map(|_| rng.normal()).collect();
        if ramp != 0.0 {
            // The ramp dominates: other dims are scaled down to keep the scores' noise small.
            for row in q.chunks_mut(D_QK) {
                for x in row.iter_mut() {
                    *x *= 0.05;
                }
                row[D_QK - 1] = 1.0;
            }
        }
        let lens: Vec<i32> = spec
            .seqlens
            .iter()
            .map(|&l| {
                i32::try_from(l)
                    .map_err(|_| Error::invalid("amla", "sequence length", format!("{l}")))
            })
            .collect::<Result<_>>()?;
        let kv_shape = [num_blocks, page, D_QK];
        let kv_cache = match spec.kv_format {
            KvFormat::Float => float_tensor(&kv_shape, cache, spec.kv_dtype)?,
            format => quantize_cache(&Tensor::f32(&kv_shape, cache)?, format)?,
        };
        Ok(AmlaInputs {
            q: float_tensor(&[b, spec.s_q, spec.h_q, D_QK], q, spec.q_dtype)?,
            kv_cache,
            block_table: Tensor::i32(&[b, width], table)?,
            cache_seqlens: Tensor::i32(&[b], lens)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_slots_are_nan_and_used_ones_are_not() {
        let spec = InputSpec::new(&[0, 1, 17, 40], 1, 2, 16, DType::BF16);
        let x = AmlaInputs::generate(&spec, 3).unwrap();
        let cache = x.kv_cache.to_f32();
        let table = x.block_table.as_i32().unwrap();
        let width = x.block_table.shape()[1];
        assert_eq!(width, 4);
        let mut finite_rows = 0;
        for (s, &len) in spec.seqlens.iter().enumerate() {
            for k in 0..len {
                let block = table[s * width + k / 16] as usize;
                assert!(
                    cache[(block * 16 + k % 16) * D_QK..][..D_QK]
                        .iter()
                        .all(|v| v.is_finite())
                );
                finite_rows += 1;
            }
        }
        let total_finite = cache.chunks(D_QK).filter(|r| r[0].is_finite()).count();
        assert_eq!(total_finite, finite_rows);
        assert_eq!(x.kv_cache.shape()[0], 1 + 2 + 3 + 2);
        // Same seed, same inputs (compared as bytes: NaN != NaN).
        let again = AmlaInputs::generate(&spec, 3).unwrap();
        assert_eq!(again.kv_cache.bytes(), x.kv_cache.bytes());
        assert_eq!((&again.q, &again.block_table), (&x.q, &x.block_table));
        assert_ne!(AmlaInputs::generate(&spec, 4).unwrap().q, x.q);
    }
}
