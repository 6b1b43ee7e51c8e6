//! Safetensors files in and out of `fusedops run`: tensors a user saved elsewhere (for example
//! with PyTorch's `safetensors.torch.save_file`) become named host tensors.
//!
//! f32, f16, bf16, i32, u32 and i8 load as they are; i64 and f64 (PyTorch's defaults for index and
//! double tensors) are narrowed to i32 and f32, with an error naming the tensor if an integer does
//! not fit. u8 and float8_e4m3fn load as raw bytes (u8: AMLA's packed 8-bit cache is saved by
//! PyTorch as one or the other). Other dtypes are refused with the tensor's name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::registry::NamedTensors;
use crate::tensor::{DType, Tensor};

fn format_error(path: &Path, why: impl Into<String>) -> Error {
    Error::Format {
        what: path.display().to_string(),
        why: why.into(),
    }
}

/// Read every tensor of a safetensors file.
pub fn load(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &bytes)
}

/// Parse the bytes of a safetensors file (`path` only names it in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NamedTensors> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| format_error(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = NamedTensors::new();
    for (name, view) in file.tensors() {
        let tensor = convert(&name, &view).map_err(|why| {
            format_error(path, format!("tensor {name:?} ({:?}): {why}", view.dtype()))
        })?;
        out.insert(name, tensor);
    }
    Ok(out)
}

fn convert(name: &str, view: &TensorView<'_>) -> std::result::Result<Tensor, String> {
    let shape = view.shape().to_vec();
    let data = view.data();
    let direct = |dtype: DType| Tensor::from_bytes(&shape, dtype, data).map_err(|e| e.to_string());
    match view.dtype() {
        Dtype::F32 => direct(DType::F32),
        Dtype::F16 => direct(DType::F16),
        Dtype::BF16 => direct(DType::BF16),
        Dtype::I32 => direct(DType::I32),
        Dtype::U32 => direct(DType::U32),
        Dtype::U8 | Dtype::F8_E4M3 => direct(DType::U8),
        Dtype::I8 => direct(DType::I8),
        Dtype::I64 => {
            let values: std::result::Result<Vec<i32>, String> = data
                .chunks_exact(8)
                .map(|c| {
                    let v = i64::from_le_bytes(c.try_into().expect("8-byte chunk"));
                    i32::try_from(v).map_err(|_| format!("value {v} does not fit in i32"))
                })
                .collect();
            Tensor::i32(&shape, values?).map_err(|e| e.to_string())
        }
        Dtype::F64 => {
            let values: Vec<f32> = data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
                .collect();
            Tensor::f32(&shape, values).map_err(|e| e.to_string())
        }
        other => Err(format!(
            "dtype {other:?} is not supported for {name:?} (use f32, f16, bf16, i32, u32, i8, i64, f64, u8 or f8_e4m3)"
        )),
    }
}

fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
        DType::U32 => Dtype::U32,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
    }
}

/// The bytes of a safetensors file holding `tensors`.
pub fn to_bytes(tensors: &NamedTensors) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(safetensors_dtype(t.dtype()), t.shape().to_vec(), t.bytes())
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Format {
                    what: format!("tensor {name:?}"),
                    why: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, None).map_err(|e| Error::Format {
        what: "safetensors".into(),
        why: e.to_string(),
    })
}

/// Write `tensors` to a safetensors file, atomically (see [`OutputFile`]).
pub fn save(path: &Path, tensors: &NamedTensors) -> Result<()> {
    let bytes = to_bytes(tensors)?;
    OutputFile::create(path)?.commit(&bytes)
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A file a command writes once, at its end, made so that nothing is lost on failure:
/// [`OutputFile::create`] is called before the work starts and proves the target can be written
/// (it creates the temporary file beside it); [`OutputFile::commit`] writes the temporary file,
/// flushes it to disk and renames it over the target, so a reader sees the old file or the
/// complete new one, never a truncated one. Dropped without a commit, it removes the temporary
/// file and leaves the target untouched.
#[derive(Debug)]
pub struct OutputFile {
    /// The file replaced (a symlink's target, so the link stays a link).
    target: PathBuf,
    temp: PathBuf,
    file: Option<std::fs::File>,
}

impl OutputFile {
    /// Check that `path` can be written and reserve a temporary file beside it.
    pub fn create(path: &Path) -> Result<Self> {
        let target = resolve(path);
        let refuse = |why: &str| Error::Format {
            what: path.display().to_string(),
            why: why.into(),
        };
        let Some(name) = target.file_name() else {
            return Err(refuse("not a file name"));
        };
        let existing = std::fs::metadata(&target).ok();
        if let Some(meta) = &existing {
            if meta.is_dir() {
                return Err(refuse("is a directory"));
            }
            if meta.permissions().readonly() {
                return Err(refuse("is read-only"));
            }
        }
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let temp = dir.join(format!(
            ".{}.{}-{}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| io_error(path, e))?;
        if let Some(meta) = existing {
            // The new file keeps the old one's permissions.
            let _ = file.set_permissions(meta.permissions());
        }
        Ok(OutputFile {
            target,
            temp,
            file: Some(file),
        })
    }

    /// Write `bytes`, flush them to disk and replace the target.
    pub fn commit(mut self, bytes: &[u8]) -> Result<()> {
        let Some(mut file) = self.file.take() else {
            return Err(io_error(
                &self.target,
                std::io::Error::other("already committed"),
            ));
        };
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(&self.target, e))?;
        drop(file);
        std::fs::rename(&self.temp, &self.target).map_err(|e| io_error(&self.target, e))?;
        // The rename is durable once the directory is flushed (where directories can be opened).
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// `path` with its directory made absolute and, when it is a symlink, followed to its target;
/// a path that cannot be resolved is kept as given.
fn resolve(path: &Path) -> PathBuf {
    if let Ok(full) = std::fs::canonicalize(path) {
        return full;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::canonicalize(dir).map_or_else(|_| path.to_path_buf(), |d| d.join(name))
        }
        _ => path.to_path_buf(),
    }
}

/// Whether `a` and `b` name the same file: the same resolved path (through symlinks and `..`),
/// or, for existing files, the same file on disk (hard links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    if resolve(a) == resolve(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return a.dev() == b.dev() && a.ino() == b.ino();
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_dtype() {
        let mut t = NamedTensors::new();
        t.insert(
            "a".into(),
            Tensor::from_f32(&[2, 2], &[1.0, -2.0, 0.5, 3.0], DType::BF16).unwrap(),
        );
        t.insert(
            "b".into(),
            Tensor::from_f32(&[3], &[1.0, 2.0, 3.0], DType::F16).unwrap(),
        );
        t.insert("c".into(), Tensor::i32(&[2], vec![-7, 9]).unwrap());
        t.insert("d".into(), Tensor::f32(&[1], vec![0.25]).unwrap());
        t.insert("e".into(), Tensor::u8(&[3], vec![0, 0x7f, 0xff]).unwrap());
        let bytes = to_bytes(&t).unwrap();
        assert_eq!(parse(Path::new("mem"), &bytes).unwrap(), t);
    }

    fn file_with(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Vec<u8> {
        let view = TensorView::new(dtype, shape, data).unwrap();
        safetensors::tensor::serialize([("x", view)], None).unwrap()
    }

    #[test]
    fn i64_and_f64_are_narrowed() {
        let ints: Vec<u8> = [5i64, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = parse(Path::new("m"), &file_with(Dtype::I64, vec![2], &ints)).unwrap();
        assert_eq!(t["x"].as_i32().unwrap(), &[5, -3]);
        let big: Vec<u8> = (1i64 << 40).to_le_bytes().to_vec();
        let err = parse(Path::new("m"), &file_with(Dtype::I64, vec![1], &big)).unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        let dbl: Vec<u8> = 1.5f64.to_le_bytes().to_vec();
        let t = parse(Path::new("m"), &file_with(Dtype::F64, vec![1], &dbl)).unwrap();
        assert_eq!(t["x"].as_f32().unwrap(), &[1.5]);
    }

    #[test]
    fn unsupported_dtype_and_corrupt_files_are_errors() {
        let err = parse(
            Path::new("m"),
            &file_with(Dtype::I16, vec![2], &[1, 2, 3, 4]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
        // FP8 E4M3 (PyTorch's float8_e4m3fn) loads as raw bytes.
        let t = parse(
            Path::new("m"),
            &file_with(Dtype::F8_E4M3, vec![2], &[0x38, 0xff]),
        )
        .unwrap();
        assert_eq!(t["x"].as_u8().unwrap(), &[0x38, 0xff]);
        let err = parse(Path::new("broken.safetensors"), b"not a file").unwrap_err();
        assert!(err.to_string().contains("broken.safetensors"), "{err}");
    }
}
