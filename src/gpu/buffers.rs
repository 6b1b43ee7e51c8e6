//! Buffers: upload, zero-fill, uniforms and readback.

use super::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{DType, DeviceTensor, Tensor, checked_numel, padded_size};

/// Usage of every tensor buffer: bound as storage, copied in and out.
const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    fn check_buffer_size(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.caps.max_buffer_size {
            return Err(Error::Limit {
                what: format!("buffer {what}"),
                need: bytes,
                max: self.caps.max_buffer_size,
            });
        }
        Ok(())
    }

    /// A zero-filled storage buffer of at least `bytes` (padded to 16).
    pub fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        let size = padded_size(bytes);
        self.check_buffer_size(label, size)?;
        // wgpu zero-initialises new buffers.
        self.checked(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: TENSOR_USAGE,
                mapped_at_creation: false,
            })
        })
    }

    /// A storage buffer holding `data` (padded to 16 bytes with zeros).
    pub fn storage_buffer_with(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let size = padded_size(data.len() as u64);
        self.check_buffer_size(label, size)?;
        let buffer = self.checked(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: TENSOR_USAGE,
                mapped_at_creation: true,
            })
        })?;
        write_mapped(&buffer, data)?;
        Ok(buffer)
    }

    /// Upload a host tensor.
    pub fn upload(&self, tensor: &Tensor) -> Result<DeviceTensor> {
        let buffer = self.storage_buffer_with("tensor", tensor.bytes())?;
        DeviceTensor::from_parts(buffer, tensor.shape(), tensor.dtype())
    }

    /// A zero-filled device tensor.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        let bytes = checked_numel("zeros", shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::shape("zeros", "shape", shape, "a size that fits in usize"))?;
        let buffer = self.storage_buffer("tensor", bytes as u64)?;
        DeviceTensor::from_parts(buffer, shape, dtype)
    }

    /// Overwrite a device tensor with host data of the same shape and dtype.
    pub fn write(&self, dst: &DeviceTensor, src: &Tensor) -> Result<()> {
        if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
            return Err(Error::shape(
                "write",
                "source tensor",
                (src.shape(), src.dtype()),
                format!("{:?} {}", dst.shape(), dst.dtype()),
            ));
        }
        let bytes = src.bytes();
        // write_buffer needs a multiple of 4 bytes; the buffer is padded to 16.
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().div_ceil(4) * 4, 0);
        self.checked(|| self.queue.write_buffer(dst.buffer(), 0, &padded))
    }

    /// A uniform buffer holding one params struct.
    pub fn uniform<T: bytemuck::Pod>(&self, params: &T) -> Result<wgpu::Buffer> {
        let bytes = bytemuck::bytes_of(params);
        let size = padded_size(bytes.len() as u64);
        let buffer = self.checked(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: true,
            })
        })?;
        write_mapped(&buffer, bytes)?;
        Ok(buffer)
    }

    /// Read `bytes` bytes from the start of `buffer` (which needs COPY_SRC).
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.div_ceil(4) * 4;
        if size == 0 {
            return Ok(Vec::new());
        }
        let staging = self.checked(|| {
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
            self.queue.submit([encoder.finish()]);
            staging
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| Error::Device("readback: map callback never ran".into()))?
            .map_err(|e| Error::Device(format!("readback: {e}")))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device(format!("readback: {e}")))?
            .to_vec();
        staging.unmap();
        let mut data = data;
        data.truncate(bytes as usize);
        Ok(data)
    }

    /// Download a device tensor.
    pub fn download(&self, tensor: &DeviceTensor) -> Result<Tensor> {
        let bytes = self.read_bytes(tensor.buffer(), tensor.size_bytes())?;
        Tensor::from_bytes(tensor.shape(), tensor.dtype(), &bytes)
    }

    /// Download a device tensor's elements as f32.
    pub fn download_f32(&self, tensor: &DeviceTensor) -> Result<Vec<f32>> {
        Ok(self.download(tensor)?.to_f32())
    }
}

/// Fill the start of a buffer created with `mapped_at_creation`, then unmap it.
fn write_mapped(buffer: &wgpu::Buffer, data: &[u8]) -> Result<()> {
    {
        let mut view = buffer
            .get_mapped_range_mut(..)
            .map_err(|e| Error::Device(format!("mapping a new buffer: {e}")))?;
        view.slice(..data.len()).copy_from_slice(data);
    }
    buffer.unmap();
    Ok(())
}
