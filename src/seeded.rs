//! Inputs made on the device from a seed, whose every value the CPU can reproduce.
//!
//! The full-size bench cases stream gigabytes of weights that only the GPU reads (deepseek-v3's
//! routed gate/up alone is 15 GB of bf16). Making them on the host would cost minutes and as much
//! host memory; instead a small kernel (`shaders/seeded_fill.wgsl`) writes them in place, and the
//! CPU reference makes only the slabs its sampled rows need (one expert, one cache page, one row)
//! with [`Seeded::slab`].
//!
//! Element `i` of slab `s` is `level(s, i) / 256 · 2^-shift`, with `level` a signed integer in
//! [-256, 255] from a 32-bit hash of (seed, s, i): uniform in [-2^-shift, 2^-shift), and exact in
//! f32, f16 and bf16 (at most 8 significant bits, a power-of-two scale), so the GPU's values and
//! the CPU's are the same bits with no rounding to agree on. int8 tensors (quantized weights)
//! take the top 8 bits of the same hash instead, `max(h / 2^24 − 128, −127)`: uniform in ±127
//! (the shift does not apply).

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel, grid};
use crate::tensor::{DType, DeviceTensor, Tensor, TensorData, padded_size};
use crate::util::fill_parallel;

const FILL: Kernel = Kernel {
    name: "seeded_fill",
    source: include_str!("../shaders/seeded_fill.wgsl"),
};

const WG: u32 = 256;

/// Mirrors `Params` in seeded_fill.wgsl.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct FillParams {
    /// `lowbias32(seed)`.
    key: u32,
    /// Slab of the buffer's element 0.
    first_slab: u32,
    /// Elements per slab.
    slab_len: u32,
    /// Elements in the buffer.
    elements: u32,
    /// `DType::shader_code` of a float dtype.
    dtype: u32,
    /// `2^-(8 + shift)`.
    scale: f32,
    pad: [u32; 2],
}

/// Chris Wellons' lowbias32, as in the shader.
pub fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// A seeded value generator (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seeded {
    pub seed: u32,
    /// Values lie in [-2^-shift, 2^-shift).
    pub shift: i32,
}

impl Seeded {
    pub fn new(seed: u32, shift: i32) -> Self {
        Seeded { seed, shift }
    }

    /// The power-of-two shift that makes values about `1/sqrt(len)` in size: dot products of
    /// `len` such values with O(1) inputs stay O(1).
    pub fn shift_for_dot(len: usize) -> i32 {
        ((len.max(1) as f64).log2() / 2.0).round() as i32
    }

    fn scale(&self) -> f32 {
        2f32.powi(-(8 + self.shift))
    }

    /// Element `i` of slab `slab`, as the kernel computes it.
    pub fn value(&self, slab: u32, i: u32) -> f32 {
        self.level(self.slab_key(slab), i)
    }

    fn slab_key(&self, slab: u32) -> u32 {
        lowbias32(slab ^ lowbias32(self.seed))
    }

    fn level(&self, slab_key: u32, i: u32) -> f32 {
        ((lowbias32(i ^ slab_key) >> 23) as i32 - 256) as f32 * self.scale()
    }

    /// Element `i` of an int8 slab with key `slab_key`, as the kernel computes it.
    fn int8(slab_key: u32, i: u32) -> i8 {
        ((lowbias32(i ^ slab_key) >> 24) as i32 - 128).max(-127) as i8
    }

    /// Slab `slab` on the host: `dims` (whose product is the slab length) in `dtype`, made on
    /// every core.
    pub fn slab(&self, slab: usize, dims: &[usize], dtype: DType) -> Result<Tensor> {
        let len: usize = dims.iter().product();
        let (slab, _) = self.check(slab, len, 1)?;
        let key = self.slab_key(slab);
        let value = |i: usize| self.level(key, i as u32);
        let data = match dtype {
            DType::F32 => {
                let mut v = vec![0.0; len];
                fill_parallel(&mut v, value);
                TensorData::F32(v)
            }
            DType::F16 => {
                let mut v = vec![f16::ZERO; len];
                fill_parallel(&mut v, |i| f16::from_f32(value(i)));
                TensorData::F16(v)
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; len];
                fill_parallel(&mut v, |i| bf16::from_f32(value(i)));
                TensorData::BF16(v)
            }
            DType::I8 => {
                let mut v = vec![0i8; len];
                fill_parallel(&mut v, |i| Self::int8(key, i as u32));
                TensorData::I8(v)
            }
            other => return Err(Error::unsupported("seeded inputs", format!("{other}"))),
        };
        Tensor::new(dims, data)
    }

    /// Rows `rows` of a seeded `[m, len]` matrix whose slabs are its rows, as `[rows.len(), len]`.
    pub fn rows(&self, rows: &[usize], len: usize, dtype: DType) -> Result<Tensor> {
        let mut bytes = Vec::with_capacity(rows.len() * len * dtype.size());
        for &r in rows {
            bytes.extend_from_slice(self.slab(r, &[len], dtype)?.bytes());
        }
        Tensor::from_bytes(&[rows.len(), len], dtype, &bytes)
    }

    /// Slab and element counts as the kernel's u32s.
    fn check(&self, slab: usize, slab_len: usize, slabs: usize) -> Result<(u32, u32)> {
        let fits = |v: usize| u32::try_from(v).ok();
        match (
            fits(slab + slabs),
            fits(slab_len.max(1)),
            fits(slab_len * slabs),
        ) {
            (Some(_), Some(len), Some(_)) => Ok((slab as u32, len)),
            _ => Err(Error::invalid(
                "seeded inputs",
                "size",
                format!("{slabs} slabs of {slab_len} from slab {slab} pass 2^32 elements"),
            )),
        }
    }

    /// Fill `tensor` on the device: its elements are slabs `first_slab..` of `slab_len` each.
    pub fn fill(
        &self,
        gpu: &Gpu,
        tensor: &DeviceTensor,
        first_slab: usize,
        slab_len: usize,
    ) -> Result<()> {
        let dtype = tensor.dtype();
        if !dtype.is_float() && dtype != DType::I8 {
            return Err(Error::unsupported("seeded inputs", format!("{dtype}")));
        }
        let elements = tensor.numel();
        let slabs = elements.div_ceil(slab_len.max(1));
        let (first, len) = self.check(first_slab, slab_len, slabs)?;
        let params = gpu.uniform(&FillParams {
            key: lowbias32(self.seed),
            first_slab: first,
            slab_len: len,
            elements: elements as u32,
            dtype: dtype.shader_code(),
            scale: self.scale(),
            pad: [0; 2],
        })?;
        let pipeline = gpu.pipeline(&FILL, "seeded_fill", &[("WG", WG as f64)])?;
        let bind = gpu.bind_group(&pipeline, &[tensor.binding(), params.as_entire_binding()])?;
        let words = (elements * dtype.size()).div_ceil(4) as u32;
        let (x, y, z) = grid(words.div_ceil(WG), gpu.caps.max_workgroups_per_dim);
        gpu.run(|rec| {
            let mut pass = rec.compute_pass("seeded fill");
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(x, y, z);
            Ok(())
        })
    }

    /// `slabs` slabs of `dims` as device tensors `[count, dims...]` of whole slabs that each
    /// fit one storage binding (the shards of expert weights); slab `s` is `s` of this generator.
    pub fn device_shards(
        &self,
        gpu: &Gpu,
        slabs: usize,
        dims: &[usize],
        dtype: DType,
    ) -> Result<Vec<DeviceTensor>> {
        let slab = (dims.iter().product::<usize>() * dtype.size()) as u64;
        let limit = gpu.caps.max_storage_binding.min(gpu.caps.max_buffer_size);
        if padded_size(slab) > limit {
            return Err(Error::Limit {
                what: "one slab (expert) of seeded inputs in a storage binding".into(),
                need: slab,
                max: limit,
            });
        }
        let mut per_shard = ((limit / slab.max(1)) as usize).clamp(1, slabs.max(1));
        while per_shard > 1 && padded_size(per_shard as u64 * slab) > limit {
            per_shard -= 1;
        }
        (0..slabs)
            .step_by(per_shard)
            .map(|first| {
                let count = per_shard.min(slabs - first);
                let shape: Vec<usize> =
                    std::iter::once(count).chain(dims.iter().copied()).collect();
                let tensor = gpu.zeros(&shape, dtype)?;
                self.fill(gpu, &tensor, first, dims.iter().product())?;
                Ok(tensor)
            })
            .collect()
    }

    /// A new device tensor of `shape` whose slabs are its first-dimension rows (slab `r` is
    /// row `r`, `first_slab + r` in general).
    pub fn device_tensor(
        &self,
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        first_slab: usize,
    ) -> Result<DeviceTensor> {
        let tensor = gpu.zeros(shape, dtype)?;
        let slab_len = shape.iter().skip(1).product();
        self.fill(gpu, &tensor, first_slab, slab_len)?;
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_exact_in_every_float_dtype_and_spread() {
        let s = Seeded::new(7, 3);
        let v: Vec<f32> = (0..4096).map(|i| s.value(2, i)).collect();
        for &x in &v {
            assert!((-0.125..0.125).contains(&x), "{x}");
            assert_eq!(bf16::from_f32(x).to_f32(), x);
            assert_eq!(f16::from_f32(x).to_f32(), x);
        }
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        let distinct: std::collections::BTreeSet<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert!(distinct.len() > 400, "{} levels", distinct.len());
        assert_ne!(s.value(3, 0), s.value(2, 0));
        assert_ne!(Seeded::new(8, 3).value(2, 0), s.value(2, 0));
    }

    #[test]
    fn slabs_and_rows_agree() {
        let s = Seeded::new(1, 0);
        let slab = s.slab(5, &[3, 4], DType::BF16).unwrap();
        assert_eq!(slab.shape(), &[3, 4]);
        assert_eq!(slab.to_f32()[7], s.value(5, 7));
        let rows = s.rows(&[5, 2], 12, DType::F32).unwrap();
        assert_eq!(&rows.to_f32()[..12], &slab.to_f32()[..]);
        assert_eq!(rows.to_f32()[12], s.value(2, 0));
    }

    #[test]
    fn shift_keeps_dot_products_of_order_one() {
        assert_eq!(Seeded::shift_for_dot(5120), 6);
        assert_eq!(Seeded::shift_for_dot(1), 0);
    }
}
