//! `.npy` files in and out (float32, C order), through the `npyz` crate.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use npyz::WriterBuilder;
use thiserror::Error;

use crate::tensor::Tensor;

#[derive(Debug, Error)]
pub enum NpyError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: element type {dtype} is not float32 ('<f4'); convert with x.astype(np.float32)")]
    DType { path: PathBuf, dtype: String },
    #[error("{path}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray")]
    Fortran { path: PathBuf },
    #[error("{path}: shape {shape:?} is too large")]
    Shape { path: PathBuf, shape: Vec<u64> },
}

/// The `.npy` files of `dir` in lexicographic order of file name.
pub fn batch_files(dir: &Path) -> Result<Vec<PathBuf>, NpyError> {
    let read_err = |source| NpyError::Read { path: dir.to_path_buf(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "npy"))
        .collect();
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Reads a float32 `.npy` file.
pub fn read_f32(path: &Path) -> Result<Tensor, NpyError> {
    let read_err = |source| NpyError::Read { path: path.to_path_buf(), source };
    let f = File::open(path).map_err(read_err)?;
    let npy = npyz::NpyFile::new(BufReader::new(f)).map_err(read_err)?;
    let dtype = npy.dtype();
    let ok = matches!(&dtype, npyz::DType::Plain(ts) if ts.to_string() == "<f4");
    if !ok {
        return Err(NpyError::DType { path: path.to_path_buf(), dtype: dtype.descr() });
    }
    if npy.order() == npyz::Order::Fortran && npy.shape().len() > 1 {
        return Err(NpyError::Fortran { path: path.to_path_buf() });
    }
    let shape64 = npy.shape().to_vec();
    let shape: Vec<usize> = shape64.iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel.is_none_or(|n| n > (1usize << 34)) {
        return Err(NpyError::Shape { path: path.to_path_buf(), shape: shape64 });
    }
    let data: Vec<f32> = npy.into_vec().map_err(read_err)?;
    Ok(Tensor::f32(shape, data))
}

/// Writes a float32 `.npy` file.
pub fn write_f32(path: &Path, t: &Tensor) -> Result<(), NpyError> {
    let write_err = |source| NpyError::Write { path: path.to_path_buf(), source };
    let f = File::create(path).map_err(write_err)?;
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::new(f))
        .begin_nd()
        .map_err(write_err)?;
    w.extend(t.to_f32_vec()).map_err(write_err)?;
    w.finish().map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("acclimate-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.npy");
        let t = Tensor::f32(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, f32::MAX, 1e-30]);
        write_f32(&p, &t).unwrap();
        assert_eq!(read_f32(&p).unwrap(), t);
        std::fs::write(&p, b"\x93NUMPY garbage").unwrap();
        assert!(read_f32(&p).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
