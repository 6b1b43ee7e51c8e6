//! Host and device tensors: a shape, a dtype and the data.
//!
//! 16-bit floats are stored packed, two per 32-bit word, little-endian (element 2i in the low
//! half), which is how the shaders read them (`array<u32>`, widened in the shader). int8 is packed
//! the same way, four per word (element 4i in the low byte), the operand format of WGSL's
//! `dot4I8Packed` and `unpack4xI8`. `u8` is raw 8-bit storage, four bytes per word (byte 4i + j
//! in bits 8j..8j+7): an operator gives the bytes their meaning (AMLA's packed 8-bit latent cache).

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    U32,
    /// Raw bytes (8-bit storage whose meaning the operator defines).
    U8,
    /// Signed 8-bit integers (quantized weights and activations; see `ops::quantize`).
    I8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::I8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The code the shaders use for this dtype (`DTYPE_*` in shaders/common.wgsl).
    pub fn shader_code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::I32 => 3,
            DType::U32 => 4,
            DType::U8 => 5,
            DType::I8 => 6,
        }
    }

    /// Lower-case name, as used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::U8 => "u8",
            DType::I8 => "i8",
        }
    }

    /// Round an f32 to this dtype and back (the value a tensor of this dtype would hold).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::I32 => x.round(),
            DType::U32 => x.round().max(0.0),
            DType::U8 => x.round().clamp(0.0, 255.0),
            DType::I8 => x.round_ties_even().clamp(-128.0, 127.0),
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "i32" | "int32" => Ok(DType::I32),
            "u32" | "uint32" => Ok(DType::U32),
            "u8" | "uint8" => Ok(DType::U8),
            "i8" | "int8" => Ok(DType::I8),
            _ => Err(Error::Format {
                what: "dtype".into(),
                why: format!("unknown dtype {s:?} (expected f32, f16, bf16, i32, u32, u8 or i8)"),
            }),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The elements of a host tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    U8(Vec<u8>),
    I8(Vec<i8>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::I8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I32(_) => DType::I32,
            TensorData::U32(_) => DType::U32,
            TensorData::U8(_) => DType::U8,
            TensorData::I8(_) => DType::I8,
        }
    }
}

/// A tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// A tensor from its shape and data; the element count must match the shape.
    pub fn new(shape: &[usize], data: TensorData) -> Result<Self> {
        let numel = checked_numel("tensor", shape)?;
        if numel != data.len() {
            return Err(Error::shape(
                "tensor",
                "data",
                data.len(),
                format!("{numel} elements for shape {shape:?}"),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A float tensor of `dtype` holding `values` rounded to that dtype.
    pub fn from_f32(shape: &[usize], values: &[f32], dtype: DType) -> Result<Self> {
        let data = match dtype {
            DType::F32 => TensorData::F32(values.to_vec()),
            DType::F16 => TensorData::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => TensorData::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::I32 | DType::U32 | DType::U8 | DType::I8 => {
                return Err(Error::unsupported(
                    "tensor",
                    format!(
                        "from_f32 into {dtype}: build integer tensors with Tensor::i32/u32/u8/i8"
                    ),
                ));
            }
        };
        Tensor::new(shape, data)
    }

    /// An f32 tensor.
    pub fn f32(shape: &[usize], values: Vec<f32>) -> Result<Self> {
        Tensor::new(shape, TensorData::F32(values))
    }

    /// An i32 tensor.
    pub fn i32(shape: &[usize], values: Vec<i32>) -> Result<Self> {
        Tensor::new(shape, TensorData::I32(values))
    }

    /// A u32 tensor.
    pub fn u32(shape: &[usize], values: Vec<u32>) -> Result<Self> {
        Tensor::new(shape, TensorData::U32(values))
    }

    /// A u8 (raw bytes) tensor.
    pub fn u8(shape: &[usize], values: Vec<u8>) -> Result<Self> {
        Tensor::new(shape, TensorData::U8(values))
    }

    /// An i8 tensor.
    pub fn i8(shape: &[usize], values: Vec<i8>) -> Result<Self> {
        Tensor::new(shape, TensorData::I8(values))
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Self> {
        let n = checked_numel("tensor", shape)?;
        let data = match dtype {
            DType::F32 => TensorData::F32(vec![0.0; n]),
            DType::F16 => TensorData::F16(vec![f16::ZERO; n]),
            DType::BF16 => TensorData::BF16(vec![bf16::ZERO; n]),
            DType::I32 => TensorData::I32(vec![0; n]),
            DType::U32 => TensorData::U32(vec![0; n]),
            DType::U8 => TensorData::U8(vec![0; n]),
            DType::I8 => TensorData::I8(vec![0; n]),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Size of the elements in bytes (without any device padding).
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype().size()
    }

    /// The elements widened to f32 (integers converted by value).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The elements widened to f64 (what the CPU references compute with).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::I8(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The i32 elements, if this is an i32 tensor.
    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            TensorData::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The u32 elements, if this is a u32 tensor.
    pub fn as_u32(&self) -> Option<&[u32]> {
        match &self.data {
            TensorData::U32(v) => Some(v),
            _ => None,
        }
    }

    /// The bytes, if this is a u8 tensor.
    pub fn as_u8(&self) -> Option<&[u8]> {
        match &self.data {
            TensorData::U8(v) => Some(v),
            _ => None,
        }
    }

    /// The i8 elements, if this is an i8 tensor.
    pub fn as_i8(&self) -> Option<&[i8]> {
        match &self.data {
            TensorData::I8(v) => Some(v),
            _ => None,
        }
    }

    /// The f32 elements, if this is an f32 tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The raw little-endian bytes, as the GPU stores them.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
            TensorData::I32(v) => bytemuck::cast_slice(v),
            TensorData::U32(v) => bytemuck::cast_slice(v),
            TensorData::U8(v) => v,
            TensorData::I8(v) => bytemuck::cast_slice(v),
        }
    }

    /// A tensor of `dtype` and `shape` from raw little-endian bytes.
    pub fn from_bytes(shape: &[usize], dtype: DType, bytes: &[u8]) -> Result<Self> {
        let n = checked_numel("tensor", shape)?;
        let size = n
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::shape("tensor", "shape", shape, "a size that fits in usize"))?;
        if bytes.len() < size {
            return Err(Error::shape(
                "tensor",
                "bytes",
                bytes.len(),
                format!("{size} bytes for {n} x {dtype}"),
            ));
        }
        let bytes = &bytes[..size];
        // Copy through u32/u16 vectors: `bytes` need not be aligned.
        let data = match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::I32 => TensorData::I32(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::U32 => TensorData::U32(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            DType::BF16 => TensorData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
            ),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
        };
        Tensor::new(shape, data)
    }

    /// The same data viewed with another shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n = checked_numel("reshape", shape)?;
        if n != self.numel() {
            return Err(Error::shape(
                "tensor",
                "reshape",
                &self.shape,
                format!("{n} elements for {shape:?}"),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

/// A tensor in GPU memory. The buffer is padded to a multiple of 16 bytes so that kernels may
/// read it as `array<vec4<u32>>`; the padding is zero.
///
/// The fields are private: a `DeviceTensor` only comes from [`crate::gpu::Gpu`] (upload, zeros)
/// or an operator, so its buffer always holds at least the elements its shape describes and the
/// kernels that bind it never read past it:
///
/// ```compile_fail
/// // error[E0616]: field `buffer` of struct `DeviceTensor` is private
/// fn swap(t: &mut fusedops::tensor::DeviceTensor, other: &fusedops::tensor::DeviceTensor) {
///     t.buffer = other.buffer().clone();
/// }
/// ```
#[derive(Debug)]
pub struct DeviceTensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
}

impl DeviceTensor {
    /// A tensor over `buffer`, which must hold the elements of `shape` (refused otherwise).
    pub(crate) fn from_parts(buffer: wgpu::Buffer, shape: &[usize], dtype: DType) -> Result<Self> {
        let bytes = checked_numel("device tensor", shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| {
                Error::shape("device tensor", "shape", shape, "a size that fits in usize")
            })?;
        if buffer.size() < bytes as u64 {
            return Err(Error::shape(
                "device tensor",
                "buffer",
                buffer.size(),
                format!("at least {bytes} bytes for {shape:?} {dtype}"),
            ));
        }
        Ok(DeviceTensor {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// The buffer holding the elements (read-only access: the shape and the buffer stay
    /// consistent).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the elements occupy (without padding).
    pub fn size_bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// A binding of the whole (padded) buffer.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        self.buffer.as_entire_binding()
    }
}

/// The element count of `shape`, or an error if it does not fit `usize` (a wrapped product would
/// let a huge shape pass with a few elements of data).
pub fn checked_numel(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::shape(op, "shape", shape, "an element count that fits in usize"))
}

/// Buffer size for `bytes` of data: rounded up to 16 and never zero (wgpu rejects empty bindings).
pub fn padded_size(bytes: u64) -> u64 {
    bytes.max(1).div_ceil(16) * 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype() {
        let values = [1.5f32, -2.25, 0.0, 65504.0, 3.0e-3];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_f32(&[5], &values, dtype).unwrap();
            let back = Tensor::from_bytes(&[5], dtype, t.bytes()).unwrap();
            assert_eq!(t, back, "{dtype}");
            for (a, b) in t.to_f32().iter().zip(values) {
                assert_eq!(*a, dtype.round(b));
            }
        }
    }

    #[test]
    fn u8_is_raw_bytes() {
        let t = Tensor::u8(&[2, 3], vec![0, 1, 127, 128, 254, 255]).unwrap();
        assert_eq!((t.dtype().size(), t.size_bytes()), (1, 6));
        assert_eq!(t.bytes(), &[0, 1, 127, 128, 254, 255]);
        assert_eq!(
            Tensor::from_bytes(&[2, 3], DType::U8, t.bytes()).unwrap(),
            t
        );
        assert_eq!(t.as_u8(), Some(&[0u8, 1, 127, 128, 254, 255][..]));
        assert!(!DType::U8.is_float());
        assert_eq!("uint8".parse::<DType>().unwrap(), DType::U8);
        assert!(Tensor::from_f32(&[1], &[1.0], DType::U8).is_err());
    }

    #[test]
    fn int8_is_one_byte_per_element_packed_four_per_word() {
        let t = Tensor::i8(&[5], vec![-128, -1, 0, 1, 127]).unwrap();
        assert_eq!(t.size_bytes(), 5);
        // Element 4i is the low byte of word i, as WGSL's unpack4xI8 reads it.
        assert_eq!(t.bytes(), &[0x80, 0xff, 0x00, 0x01, 0x7f]);
        let back = Tensor::from_bytes(&[5], DType::I8, t.bytes()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_f32(), vec![-128.0, -1.0, 0.0, 1.0, 127.0]);
        assert_eq!(back.as_i8(), Some(&[-128i8, -1, 0, 1, 127][..]));
        assert_eq!("int8".parse::<DType>().unwrap(), DType::I8);
        assert!(!DType::I8.is_float());
        assert_eq!(DType::I8.round(2.5), 2.0, "ties to even");
        assert_eq!(DType::I8.round(-300.0), -128.0);
        assert_eq!(Tensor::zeros(&[3], DType::I8).unwrap().bytes(), &[0, 0, 0]);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(matches!(
            Tensor::f32(&[2, 3], vec![0.0; 5]),
            Err(Error::Shape { .. })
        ));
        assert!(Tensor::from_bytes(&[4], DType::F32, &[0u8; 15]).is_err());
        // Element counts or byte sizes that wrap are refused, not read from a short slice.
        assert!(Tensor::from_bytes(&[1 << 40, 1 << 40], DType::F32, &[0u8; 16]).is_err());
        assert!(Tensor::from_bytes(&[usize::MAX / 2 + 1], DType::F16, &[0u8; 16]).is_err());
        assert!(Tensor::from_f32(&[1], &[1.0], DType::I32).is_err());
        // A shape whose element count wraps around usize is refused, not taken as 0 elements.
        let huge = [1usize << 40, 1 << 40];
        assert!(matches!(
            Tensor::f32(&huge, vec![]),
            Err(Error::Shape { .. })
        ));
        assert!(Tensor::f32(&[0], vec![]).unwrap().reshape(&huge).is_err());
    }

    #[test]
    fn zeros_refuses_an_overflowing_shape() {
        assert!(matches!(
            Tensor::zeros(&[1 << 40, 1 << 40], DType::F32),
            Err(Error::Shape { .. })
        ));
        assert_eq!(Tensor::zeros(&[2, 3], DType::BF16).unwrap().numel(), 6);
    }

    #[test]
    fn padding_is_at_least_16_bytes() {
        assert_eq!(padded_size(0), 16);
        assert_eq!(padded_size(17), 32);
        assert_eq!(padded_size(32), 32);
    }
}
