//! Frame sources of the CLI: MNIST-style IDX files, folders of images, and videos (Y4M read
//! natively, every other container through `ffmpeg`).
//!
//! A source is named by a string (`idx:IMAGES[,LABELS]`, `dir:PATH`, `video:PATH`) and yields
//! [`Sample`]s. Datasets (IDX, folders) are indexable, so the CLI can replay them in a
//! label-correlated order; a video is read strictly in order and streamed, never loaded whole.
//!
//! A bad frame (an undecodable image) is an `Err` for that frame only: the caller reports it and
//! asks for the next one. Damage that leaves no way to find the next frame (a truncated IDX file,
//! a corrupt Y4M frame marker) is an error at open time or ends the stream after the error.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;

use acclimate::stream::frame::{Frame, PixelFormat, YuvMatrix, YuvRange};

/// Errors of opening or reading a source. Each names the file and what is wrong with it.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The source string is not one of the accepted forms.
    #[error("bad source '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    /// A file or folder could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are malformed (bad magic, truncated data, inconsistent counts, ...).
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    /// An image file could not be decoded.
    #[error("cannot decode image {}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    /// The video needs ffmpeg, which could not be started.
    #[error(
        "cannot decode {}: ffmpeg (`{}`) was not found ({reason}); install ffmpeg (e.g. `apt-get install ffmpeg`, \
         `brew install ffmpeg`) or convert the video to Y4M elsewhere \
         (`ffmpeg -i VIDEO -pix_fmt yuv420p VIDEO.y4m`) and pass the .y4m file",
        path.display(), program.to_string_lossy()
    )]
    FfmpegMissing { path: PathBuf, program: OsString, reason: String },
    /// ffmpeg started but failed to decode the video.
    #[error("ffmpeg failed on {}: {reason}", path.display())]
    Ffmpeg { path: PathBuf, reason: String },
    /// `get` beyond the end of a dataset.
    #[error("sample {index} is out of range: the source has {len} samples")]
    OutOfRange { index: usize, len: usize },
    /// `get` on a video, which is read in order only.
    #[error("{} is a video: it is read in order (next_frame), without random access", path.display())]
    NotIndexable { path: PathBuf },
}

/// One frame of a source, with what is known about it.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Position in the source (dataset index, or frame number of a video from 0).
    pub index: usize,
    /// The pixels: RGB8 or Gray8 for datasets, I420 for videos. Datasets carry no time
    /// (timestamp 0); a video frame's timestamp comes from its frame rate.
    pub frame: Frame,
    /// The class id, when the source has labels.
    pub label: Option<u32>,
    /// The image's path relative to the folder (`dir:` sources).
    pub name: Option<String>,
}

/// A frame source.
pub enum Source {
    /// MNIST-style IDX files (`idx:IMAGES[,LABELS]`).
    Idx(IdxSource),
    /// A folder of PNG/JPEG images (`dir:PATH`).
    Dir(DirSource),
    /// A video (`video:PATH`).
    Video(VideoSource),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Idx(s) => write!(f, "Source::Idx({}, {} samples)", s.images_path.display(), s.count),
            Source::Dir(s) => write!(f, "Source::Dir({}, {} images)", s.root.display(), s.files.len()),
            Source::Video(s) => write!(f, "Source::Video({}, {:?})", s.path.display(), s.reader.header()),
        }
    }
}

/// The ffmpeg program `video:` sources run: `ACCLIMATE_FFMPEG` if set, else `ffmpeg` on the PATH.
pub fn ffmpeg_program() -> OsString {
    std::env::var_os("ACCLIMATE_FFMPEG").unwrap_or_else(|| OsString::from("ffmpeg"))
}

impl Source {
    /// Opens a source from its spec: `idx:IMAGES[,LABELS]`, `dir:PATH` or `video:PATH`.
    pub fn open(spec: &str) -> Result<Source, SourceError> {
        let bad = |reason: &str| SourceError::Spec { spec: spec.to_string(), reason: reason.to_string() };
        let Some((kind, rest)) = spec.split_once(':') else {
            return Err(bad("expected idx:IMAGES[,LABELS], dir:PATH or video:PATH"));
        };
        if rest.is_empty() {
            return Err(bad("the path is empty"));
        }
        match kind {
            "idx" => {
                let (images, labels) = match rest.split_once(',') {
                    Some((i, l)) if i.is_empty() || l.is_empty() => return Err(bad("expected idx:IMAGES,LABELS")),
                    Some((i, l)) => (PathBuf::from(i), Some(PathBuf::from(l))),
                    None => (PathBuf::from(rest), None),
                };
                Ok(Source::Idx(IdxSource::open(&images, labels.as_deref())?))
            }
            "dir" => Ok(Source::Dir(DirSource::open(Path::new(rest))?)),
            "video" => Source::open_video(Path::new(rest), &ffmpeg_program()),
            _ => Err(bad(&format!("unknown kind '{kind}': expected idx:, dir: or video:"))),
        }
    }

    /// Opens a video with an explicit ffmpeg program (used when the file is not Y4M).
    pub fn open_video(path: &Path, ffmpeg: &OsStr) -> Result<Source, SourceError> {
        Ok(Source::Video(VideoSource::open(path, ffmpeg)?))
    }

    /// The number of samples of a dataset; `None` for a video (its length is unknown).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Option<usize> {
        match self {
            Source::Idx(s) => Some(s.count),
            Source::Dir(s) => Some(s.files.len()),
            Source::Video(_) => None,
        }
    }

    /// Every sample's label, by index, when the dataset is labelled.
    pub fn labels(&self) -> Option<Vec<u32>> {
        match self {
            Source::Idx(s) => s.labels.clone(),
            Source::Dir(s) => s.labels.clone(),
            Source::Video(_) => None,
        }
    }

    /// Class names by id, for folders whose classes are named (sub-folders or a labels file
    /// with non-numeric labels).
    pub fn class_names(&self) -> Option<&[String]> {
        match self {
            Source::Dir(s) => s.class_names.as_deref(),
            _ => None,
        }
    }

    /// Sample `index` of a dataset. Videos have no random access ([`SourceError::NotIndexable`]).
    pub fn get(&mut self, index: usize) -> Result<Sample, SourceError> {
        match self {
            Source::Idx(s) => s.get(index),
            Source::Dir(s) => s.get(index),
            Source::Video(v) => Err(SourceError::NotIndexable { path: v.path.clone() }),
        }
    }

    /// The next sample in source order; `None` at the end. An `Err` concerns one frame of a
    /// dataset (the next call goes on with the following one); a video ends after a
    /// structural error, since the next frame cannot be found.
    pub fn next_frame(&mut self) -> Option<Result<Sample, SourceError>> {
        match self {
            Source::Idx(s) => {
                let i = s.cursor;
                (i < s.count).then(|| {
                    s.cursor += 1;
                    s.get(i)
                })
            }
            Source::Dir(s) => {
                let i = s.cursor;
                (i < s.files.len()).then(|| {
                    s.cursor += 1;
                    s.get(i)
                })
            }
            Source::Video(v) => v.next_frame(),
        }
    }
}

impl Iterator for Source {
    type Item = Result<Sample, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame()
    }
}

// ---------------------------------------------------------------------------------------------
// IDX

/// Images (and labels) of MNIST-style IDX files, held in memory.
pub struct IdxSource {
    images_path: PathBuf,
    count: usize,
    height: u32,
    width: u32,
    /// 1 (gray) or 3 (RGB, interleaved).
    channels: usize,
    pixels: Vec<u8>,
    labels: Option<Vec<u32>>,
    cursor: usize,
}

/// A decoded IDX array of unsigned bytes.
struct IdxArray {
    dims: Vec<usize>,
    data: Vec<u8>,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Fills `buf` from `r` as far as the data goes; returns how many bytes were read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_idx(path: &Path) -> Result<IdxArray, SourceError> {
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let format = |reason: String| SourceError::Format { path: path.to_path_buf(), reason };
    let mut file = BufReader::new(std::fs::File::open(path).map_err(io)?);
    // gzip is recognised by its magic bytes, whatever the file is called.
    let gzipped = file.fill_buf().map_err(io)?.starts_with(&GZIP_MAGIC);
    let mut reader: Box<dyn Read> =
        if gzipped { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
    let what = if gzipped { "the decompressed data" } else { "the file" };
    let mut magic = [0u8; 4];
    let got = read_full(&mut reader, &mut magic).map_err(io)?;
    if got < 4 {
        return Err(format(format!("not an IDX file: {what} has {got} bytes, shorter than the 4-byte magic")));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(format(format!(
            "not an IDX file: magic bytes {:02x} {:02x} {:02x} {:02x}, expected 00 00 08 <rank>",
            magic[0], magic[1], magic[2], magic[3]
        )));
    }
    if magic[2] != 0x08 {
        let name = match magic[2] {
            0x09 => "signed byte",
            0x0b => "int16",
            0x0c => "int32",
            0x0d => "float32",
            0x0e => "float64",
            _ => "unknown",
        };
        return Err(format(format!(
            "IDX element type 0x{:02x} ({name}) is not supported: only 0x08 (unsigned byte)",
            magic[2]
        )));
    }
    let rank = magic[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(format(format!("IDX rank {rank} is not supported (1 for labels, 3 or 4 for images)")));
    }
    let mut dim_bytes = vec![0u8; 4 * rank];
    let got = read_full(&mut reader, &mut dim_bytes).map_err(io)?;
    if got < dim_bytes.len() {
        return Err(format(format!(
            "truncated IDX header: {rank} dimensions need {} bytes, {what} has {got}",
            4 * rank
        )));
    }
    let dims: Vec<usize> =
        dim_bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format(format!("IDX dimensions {dims:?} overflow")))?;
    // Grows with the data actually present, so a header that claims terabytes allocates nothing.
    let mut data = Vec::new();
    (&mut reader).take(expected as u64).read_to_end(&mut data).map_err(io)?;
    if data.len() < expected {
        return Err(format(format!(
            "truncated IDX data: dimensions {dims:?} need {expected} bytes after the header, {what} has {}",
            data.len()
        )));
    }
    let mut extra = [0u8; 1];
    if read_full(&mut reader, &mut extra).map_err(io)? > 0 {
        return Err(format(format!("{what} has bytes after the {expected} data bytes of dimensions {dims:?}")));
    }
    Ok(IdxArray { dims, data })
}

impl IdxSource {
    /// Reads `images` (rank 3 `[n, h, w]` gray, or rank 4 `[n, h, w, c]` with c = 1 or 3) and
    /// optional `labels` (rank 1 `[n]`), raw or gzip-compressed.
    pub fn open(images: &Path, labels: Option<&Path>) -> Result<IdxSource, SourceError> {
        let format = |path: &Path, reason: String| SourceError::Format { path: path.to_path_buf(), reason };
        let img = read_idx(images)?;
        let (count, h, w, channels) = match img.dims[..] {
            [n, h, w] => (n, h, w, 1),
            [n, h, w, c] if c == 1 || c == 3 => (n, h, w, c),
            _ => {
                return Err(format(
                    images,
                    format!(
                        "IDX images must have dimensions [n, h, w] or [n, h, w, 1|3], this file has {:?}",
                        img.dims
                    ),
                ));
            }
        };
        if h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
            return Err(format(images, format!("IDX images of {h}x{w} pixels")));
        }
        let labels = match labels {
            Some(lp) => {
                let lab = read_idx(lp)?;
                let [n] = lab.dims[..] else {
                    return Err(format(
                        lp,
                        format!("IDX labels must have one dimension [n], this file has {:?}", lab.dims),
                    ));
                };
                if n != count {
                    return Err(format(
                        lp,
                        format!("{n} labels for {count} images (in {}): the counts must match", images.display()),
                    ));
                }
                Some(lab.data.iter().map(|&b| b as u32).collect())
            }
            None => None,
        };
        Ok(IdxSource {
            images_path: images.to_path_buf(),
            count,
            height: h as u32,
            width: w as u32,
            channels,
            pixels: img.data,
            labels,
            cursor: 0,
        })
    }

    /// Sample `index`.
    pub fn get(&self, index: usize) -> Result<Sample, SourceError> {
        if index >= self.count {
            return Err(SourceError::OutOfRange { index, len: self.count });
        }
        let size = self.height as usize * self.width as usize * self.channels;
        let data = self.pixels[index * size..(index + 1) * size].to_vec();
        let frame = if self.channels == 3 {
            Frame::rgb8(self.width, self.height, data)
        } else {
            Frame::gray8(self.width, self.height, data)
        };
        Ok(Sample { index, frame, label: self.labels.as_ref().map(|l| l[index]), name: None })
    }
}

// ---------------------------------------------------------------------------------------------
// Folders of images

/// PNG and JPEG images of a folder, sorted by path, with labels from class sub-folders or a
/// `labels.csv`/`labels.txt` file. Images are decoded when asked for.
pub struct DirSource {
    root: PathBuf,
    /// Paths relative to `root`, sorted.
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    class_names: Option<Vec<String>>,
    cursor: usize,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
}

/// Deep enough for any dataset layout, shallow enough to stop a symlink cycle.
const MAX_DIR_DEPTH: usize = 8;

fn list_images(root: &Path, rel: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), SourceError> {
    let dir = root.join(rel);
    let io = |source| SourceError::Io { path: dir.clone(), source };
    for entry in std::fs::read_dir(&dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        // Hidden files (.DS_Store, editors' temporaries) are never samples.
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let rel_path = rel.join(&name);
        let full = root.join(&rel_path);
        let meta = std::fs::metadata(&full).map_err(|source| SourceError::Io { path: full.clone(), source })?;
        if meta.is_dir() {
            if depth + 1 >= MAX_DIR_DEPTH {
                return Err(SourceError::Format {
                    path: full,
                    reason: format!("folders nested deeper than {MAX_DIR_DEPTH} levels (a symlink cycle?)"),
                });
            }
            list_images(root, &rel_path, depth + 1, out)?;
        } else if is_image(&rel_path) {
            out.push(rel_path);
        }
    }
    Ok(())
}

/// Ids for class names: the integers themselves when every name is one, else the sorted names'
/// positions. Returns the id per name and, for named classes, the names by id.
fn class_ids(names: &BTreeSet<String>) -> (HashMap<String, u32>, Option<Vec<String>>) {
    let numeric: Option<Vec<u32>> = names.iter().map(|n| n.trim().parse::<u32>().ok()).collect();
    match numeric {
        Some(ids) => (names.iter().cloned().zip(ids).collect(), None),
        None => {
            let sorted: Vec<String> = names.iter().cloned().collect();
            let ids = sorted.iter().enumerate().map(|(i, n)| (n.clone(), i as u32)).collect();
            (ids, Some(sorted))
        }
    }
}

fn rel_key(p: &Path) -> String {
    p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
}

/// Labels from a `filename,label` file: one entry per image of the folder, by relative path or,
/// when unambiguous, by file name.
fn labels_from_file(file: &Path, files: &[PathBuf]) -> Result<(Vec<u32>, Option<Vec<String>>), SourceError> {
    let format = |reason: String| SourceError::Format { path: file.to_path_buf(), reason };
    let text = std::fs::read_to_string(file).map_err(|source| SourceError::Io { path: file.to_path_buf(), source })?;
    let by_rel: HashMap<String, usize> = files.iter().enumerate().map(|(i, f)| (rel_key(f), i)).collect();
    let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        if let Some(n) = f.file_name() {
            by_name.entry(n.to_string_lossy().into_owned()).or_default().push(i);
        }
    }
    let mut entry: Vec<Option<String>> = vec![None; files.len()];
    let mut first = true;
    for (lineno, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let split = match line.rsplit_once(',') {
            Some(s) => Some(s),
            None => line.rsplit_once(char::is_whitespace),
        };
        let Some((name, label)) = split.map(|(n, l)| (n.trim().trim_start_matches("./"), l.trim())) else {
            return Err(format(format!("line {lineno}: expected `filename,label`, got '{line}'")));
        };
        // A first line such as `filename,label` is a header: it names no image.
        if std::mem::take(&mut first) && !is_image(Path::new(name)) {
            continue;
        }
        if label.is_empty() {
            return Err(format(format!("line {lineno}: '{name}' has an empty label")));
        }
        let index = match by_rel.get(name) {
            Some(&i) => i,
            None => match by_name.get(name).map(Vec::as_slice) {
                Some([i]) => *i,
                Some(many) => {
                    return Err(format(format!(
                        "line {lineno}: '{name}' matches {} images in different folders; give the path relative to the folder",
                        many.len()
                    )));
                }
                None => {
                    return Err(format(format!("line {lineno}: '{name}' is not a PNG or JPEG image of the folder")));
                }
            },
        };
        if entry[index].replace(label.to_string()).is_some() {
            return Err(format(format!("line {lineno}: a second label for '{name}'")));
        }
    }
    if let Some(missing) = entry.iter().position(Option::is_none) {
        return Err(format(format!("no label for image '{}'", rel_key(&files[missing]))));
    }
    let entry: Vec<String> = entry.into_iter().flatten().collect();
    let names: BTreeSet<String> = entry.iter().cloned().collect();
    let (ids, class_names) = class_ids(&names);
    Ok((entry.iter().map(|n| ids[n]).collect(), class_names))
}

impl DirSource {
    /// Lists the PNG/JPEG images under `root` (sorted by relative path) and their labels: from
    /// `labels.csv` or `labels.txt` (`filename,label` lines, an optional header) when present,
    /// else from the first-level sub-folder of each image (class names sorted → ids, or the
    /// folder names themselves when all are integers), else none.
    pub fn open(root: &Path) -> Result<DirSource, SourceError> {
        let format = |reason: String| SourceError::Format { path: root.to_path_buf(), reason };
        let mut files = Vec::new();
        list_images(root, Path::new(""), 0, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(format("no PNG or JPEG images in this folder".into()));
        }
        let csv = root.join("labels.csv");
        let txt = root.join("labels.txt");
        let (labels, class_names) = match (csv.is_file(), txt.is_file()) {
            (true, true) => return Err(format("both labels.csv and labels.txt are present: keep one".into())),
            (true, false) => {
                let (l, n) = labels_from_file(&csv, &files)?;
                (Some(l), n)
            }
            (false, true) => {
                let (l, n) = labels_from_file(&txt, &files)?;
                (Some(l), n)
            }
            (false, false) => {
                let class_of = |f: &PathBuf| -> Option<String> {
                    let mut c = f.components();
                    let first = c.next()?;
                    c.next().map(|_| first.as_os_str().to_string_lossy().into_owned())
                };
                let classes: Vec<Option<String>> = files.iter().map(class_of).collect();
                let in_sub = classes.iter().filter(|c| c.is_some()).count();
                if in_sub == 0 {
                    (None, None)
                } else if in_sub < files.len() {
                    let top = files.iter().zip(&classes).find(|(_, c)| c.is_none()).map(|(f, _)| rel_key(f));
                    return Err(format(format!(
                        "images both in class sub-folders and at the top level ('{}'): move them into \
                         sub-folders or give a labels.csv",
                        top.unwrap_or_default()
                    )));
                } else {
                    let names: BTreeSet<String> = classes.iter().flatten().cloned().collect();
                    let (ids, class_names) = class_ids(&names);
                    (Some(classes.iter().flatten().map(|c| ids[c]).collect()), class_names)
                }
            }
        };
        Ok(DirSource { root: root.to_path_buf(), files, labels, class_names, cursor: 0 })
    }

    /// Sample `index`, decoded now: gray images as Gray8, every other image as RGB8.
    pub fn get(&self, index: usize) -> Result<Sample, SourceError> {
        let Some(rel) = self.files.get(index) else {
            return Err(SourceError::OutOfRange { index, len: self.files.len() });
        };
        let path = self.root.join(rel);
        let bytes = std::fs::read(&path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
        // The format comes from the content, so a PNG named .jpg still decodes.
        let img = image::load_from_memory(&bytes)
            .map_err(|e| SourceError::Image { path: path.clone(), reason: e.to_string() })?;
        let (w, h) = (img.width(), img.height());
        let frame = if img.color().has_color() {
            Frame::rgb8(w, h, img.into_rgb8().into_raw())
        } else {
            Frame::gray8(w, h, img.into_luma8().into_raw())
        };
        Ok(Sample { index, frame, label: self.labels.as_ref().map(|l| l[index]), name: Some(rel_key(rel)) })
    }
}

// ---------------------------------------------------------------------------------------------
// Y4M

/// How a Y4M stream stores chroma. Every one of them is delivered as I420.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Y4mChroma {
    /// 4:2:0 (`420jpeg`, `420paldv`, `420mpeg2`, `420`): the planes are I420's; the variants
    /// differ only in chroma siting, which is not resampled.
    C420,
    /// 4:2:2, averaged vertically to 4:2:0.
    C422,
    /// 4:4:4, averaged over 2×2 blocks to 4:2:0.
    C444,
    /// Luma only; chroma is neutral (128).
    Mono,
}

/// The stream header of a Y4M file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Y4mHeader {
    pub width: u32,
    pub height: u32,
    /// Frames per second as numerator and denominator (`F30000:1001`).
    pub rate: (u32, u32),
    /// The `C` parameter as written (`420jpeg` when absent, the format's default).
    pub colorspace: String,
    pub chroma: Y4mChroma,
    /// Sample range: video range unless ffmpeg's `XCOLORRANGE=FULL` extension says otherwise.
    /// Y4M carries no matrix; frames are tagged BT.601, as most decoders assume.
    pub range: YuvRange,
}

impl Y4mHeader {
    /// Bytes of one frame's pixel data in the file.
    fn frame_bytes(&self) -> usize {
        let (w, h) = (self.width as usize, self.height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        match self.chroma {
            Y4mChroma::C420 => w * h + 2 * cw * ch,
            Y4mChroma::C422 => w * h + 2 * cw * h,
            Y4mChroma::C444 => 3 * w * h,
            Y4mChroma::Mono => w * h,
        }
    }

    /// The timestamp of frame `index`, in microseconds, rounded down.
    pub fn timestamp_us(&self, index: usize) -> i64 {
        let (num, den) = (self.rate.0 as u128, self.rate.1 as u128);
        (index as u128 * 1_000_000 * den / num).min(i64::MAX as u128) as i64
    }
}

/// Longest header or frame-marker line accepted; real ones are well under 100 bytes.
const MAX_Y4M_LINE: u64 = 4096;
/// Largest frame accepted (16384² luma), so a corrupt header cannot ask for absurd buffers.
const MAX_Y4M_SIDE: u32 = 16384;

/// Reads the line up to `\n` (excluded). `Ok(None)` at a clean end of stream.
fn read_line(r: &mut dyn BufRead) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut line = Vec::new();
    r.take(MAX_Y4M_LINE).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Ok(None);
    }
    let complete = line.last() == Some(&b'\n');
    if complete {
        line.pop();
    }
    Ok(Some((line, complete)))
}

/// A streaming Y4M reader: frames are read one at a time from any byte stream (a file, or
/// ffmpeg's output pipe) and delivered as I420 frames.
pub struct Y4mReader<R: Read> {
    reader: BufReader<R>,
    header: Y4mHeader,
    /// Where the bytes come from, for error messages.
    origin: PathBuf,
    next_index: usize,
    done: bool,
}

impl<R: Read> Y4mReader<R> {
    /// Reads and checks the stream header. `origin` names the data in error messages.
    pub fn new(reader: R, origin: &Path) -> Result<Self, SourceError> {
        let mut reader = BufReader::new(reader);
        let format = |reason: String| SourceError::Format { path: origin.to_path_buf(), reason };
        let io = |source| SourceError::Io { path: origin.to_path_buf(), source };
        let (line, complete) = read_line(&mut reader).map_err(io)?.ok_or_else(|| format("empty Y4M stream".into()))?;
        if !line.starts_with(b"YUV4MPEG2") {
            return Err(format("not a Y4M stream: it does not start with 'YUV4MPEG2'".into()));
        }
        if !complete {
            return Err(format(format!("Y4M header not terminated by a newline within {MAX_Y4M_LINE} bytes")));
        }
        let text = std::str::from_utf8(&line).map_err(|_| format("the Y4M header is not ASCII text".into()))?;
        let mut tokens = text.split(' ');
        if tokens.next() != Some("YUV4MPEG2") {
            return Err(format("not a Y4M stream: the header must start with 'YUV4MPEG2 '".into()));
        }
        let (mut width, mut height, mut rate, mut colorspace) = (None, None, None, None);
        let mut range = YuvRange::Video;
        for tok in tokens.filter(|t| !t.is_empty()) {
            let (tag, value) = tok.split_at(1);
            let dim = |v: &str, what: &str| -> Result<u32, SourceError> {
                match v.parse::<u32>() {
                    Ok(n) if (1..=MAX_Y4M_SIDE).contains(&n) => Ok(n),
                    _ => Err(format(format!("Y4M {what} '{v}' is not an integer in 1..={MAX_Y4M_SIDE}"))),
                }
            };
            match tag {
                "W" => width = Some(dim(value, "width")?),
                "H" => height = Some(dim(value, "height")?),
                "F" => {
                    let parsed = value
                        .split_once(':')
                        .and_then(|(n, d)| Some((n.parse::<u32>().ok()?, d.parse::<u32>().ok()?)))
                        .filter(|&(n, d)| n > 0 && d > 0);
                    rate = Some(parsed.ok_or_else(|| {
                        format(format!("Y4M frame rate 'F{value}' is not N:D with positive integers"))
                    })?);
                }
                "C" => colorspace = Some(value.to_string()),
                "X" if value == "COLORRANGE=FULL" => range = YuvRange::Full,
                // Interlacing, aspect ratio and extensions do not change the pixel data.
                _ => {}
            }
        }
        let width = width.ok_or_else(|| format("the Y4M header has no width (W)".into()))?;
        let height = height.ok_or_else(|| format("the Y4M header has no height (H)".into()))?;
        let rate = rate.ok_or_else(|| format("the Y4M header has no frame rate (F)".into()))?;
        let colorspace = colorspace.unwrap_or_else(|| "420jpeg".to_string());
        let chroma = match colorspace.as_str() {
            "420jpeg" | "420paldv" | "420mpeg2" | "420" => Y4mChroma::C420,
            "422" => Y4mChroma::C422,
            "444" => Y4mChroma::C444,
            "mono" => Y4mChroma::Mono,
            other => {
                return Err(format(format!(
                    "Y4M colour space C{other} is not supported (8-bit 420jpeg, 420paldv, 420mpeg2, 420, 422, 444 \
                     or mono); convert with `ffmpeg -i IN -pix_fmt yuv420p OUT.y4m`"
                )));
            }
        };
        let header = Y4mHeader { width, height, rate, colorspace, chroma, range };
        Ok(Y4mReader { reader, header, origin: origin.to_path_buf(), next_index: 0, done: false })
    }

    /// The stream header.
    pub fn header(&self) -> &Y4mHeader {
        &self.header
    }

    /// The next frame as I420 (timestamp from the frame rate); `None` at the end. After an
    /// error the stream ends: a damaged marker or a short frame leaves no way to resynchronise.
    pub fn read_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        if self.done {
            return None;
        }
        let r = self.read_frame_inner();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }

    fn read_frame_inner(&mut self) -> Option<Result<Frame, SourceError>> {
        let index = self.next_index;
        let format = |reason: String| SourceError::Format { path: self.origin.clone(), reason };
        let (line, complete) = match read_line(&mut self.reader) {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(source) => return Some(Err(SourceError::Io { path: self.origin.clone(), source })),
        };
        let is_marker = line.starts_with(b"FRAME") && (line.len() == 5 || line[5] == b' ');
        if !is_marker {
            return Some(Err(format(format!("frame {index}: expected a FRAME marker"))));
        }
        if !complete {
            return Some(Err(format(format!("frame {index}: truncated FRAME marker"))));
        }
        let mut raw = vec![0u8; self.header.frame_bytes()];
        match read_full(&mut self.reader, &mut raw) {
            Ok(n) if n == raw.len() => {}
            Ok(n) => {
                return Some(Err(format(format!(
                    "frame {index}: truncated, {n} of its {} bytes are present",
                    raw.len()
                ))));
            }
            Err(source) => return Some(Err(SourceError::Io { path: self.origin.clone(), source })),
        }
        self.next_index += 1;
        let mut frame = to_i420(&self.header, raw);
        frame.timestamp_us = self.header.timestamp_us(index);
        Some(Ok(frame))
    }
}

/// Rounded mean of a few bytes.
fn mean_u8(vals: &[u8]) -> u8 {
    let n = vals.len() as u32;
    ((vals.iter().map(|&v| v as u32).sum::<u32>() + n / 2) / n) as u8
}

/// An I420 frame from one Y4M frame's bytes.
fn to_i420(h: &Y4mHeader, raw: Vec<u8>) -> Frame {
    let (w, ht) = (h.width as usize, h.height as usize);
    let (cw, ch) = (w.div_ceil(2), ht.div_ceil(2));
    let data = match h.chroma {
        Y4mChroma::C420 => raw,
        Y4mChroma::Mono => {
            let mut d = raw;
            d.resize(w * ht + 2 * cw * ch, 128);
            d
        }
        Y4mChroma::C422 | Y4mChroma::C444 => {
            // Source chroma planes are `sw` wide and `ht` high; 4:2:0 keeps one sample per 2×2
            // block of luma (one per vertical pair for 4:2:2).
            let sw = if h.chroma == Y4mChroma::C422 { cw } else { w };
            let mut d = Vec::with_capacity(w * ht + 2 * cw * ch);
            d.extend_from_slice(&raw[..w * ht]);
            for p in 0..2 {
                let plane = &raw[w * ht + p * sw * ht..w * ht + (p + 1) * sw * ht];
                for y in 0..ch {
                    for x in 0..cw {
                        let mut block = [0u8; 4];
                        let mut n = 0;
                        for yy in (2 * y)..(2 * y + 2).min(ht) {
                            let xs = if sw == w { (2 * x)..(2 * x + 2).min(w) } else { x..x + 1 };
                            for xx in xs {
                                block[n] = plane[yy * sw + xx];
                                n += 1;
                            }
                        }
                        d.push(mean_u8(&block[..n]));
                    }
                }
            }
            d
        }
    };
    Frame::i420(h.width, h.height, data).with_yuv(YuvMatrix::Bt601, h.range)
}

/// Writes I420 frames as a `C420jpeg` Y4M file at `rate` (numerator, denominator) frames per
/// second. Every frame must be I420 and share the first one's size; planes may be strided.
/// The first frame's range is recorded (`XCOLORRANGE=FULL`); the matrix is not (Y4M has none).
pub fn write_y4m(path: &Path, rate: (u32, u32), frames: &[Frame]) -> Result<(), SourceError> {
    let format = |reason: String| SourceError::Format { path: path.to_path_buf(), reason };
    let io = |source| SourceError::Io { path: path.to_path_buf(), source };
    let first = frames.first().ok_or_else(|| format("no frames to write".into()))?;
    let (w, h) = (first.width, first.height);
    if w == 0 || h == 0 || rate.0 == 0 || rate.1 == 0 {
        return Err(format(format!("cannot write {w}x{h} frames at {}:{} frames per second", rate.0, rate.1)));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    // The range travels in ffmpeg's extension, which this reader understands too.
    let range = if first.yuv_range == YuvRange::Full { " XCOLORRANGE=FULL" } else { "" };
    writeln!(out, "YUV4MPEG2 W{w} H{h} F{}:{} Ip A1:1 C420jpeg{range}", rate.0, rate.1).map_err(io)?;
    let (cw, ch) = ((w as usize).div_ceil(2), (h as usize).div_ceil(2));
    for (i, f) in frames.iter().enumerate() {
        if f.format != PixelFormat::I420 || f.planes.len() != 3 || (f.width, f.height) != (w, h) {
            return Err(format(format!("frame {i}: expected a {w}x{h} I420 frame with 3 planes")));
        }
        out.write_all(b"FRAME\n").map_err(io)?;
        for (p, (pw, ph)) in f.planes.iter().zip([(w as usize, h as usize), (cw, ch), (cw, ch)]) {
            for y in 0..ph {
                for x in 0..pw {
                    let o = p.offset + y * p.row_stride + x * p.pixel_stride;
                    let b = *f.data.get(o).ok_or_else(|| format(format!("frame {i}: data shorter than its planes")))?;
                    out.write_all(&[b]).map_err(io)?;
                }
            }
        }
    }
    out.flush().map_err(io)
}

// ---------------------------------------------------------------------------------------------
// Videos

/// ffmpeg's stderr is kept up to this many bytes (the tail), for error messages.
const STDERR_TAIL: usize = 4096;

struct Ffmpeg {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
}

impl Ffmpeg {
    /// Waits for ffmpeg to exit; an error carrying its stderr when it failed.
    fn finish(&mut self, path: &Path) -> Result<(), SourceError> {
        let status = self.child.wait().map_err(|source| SourceError::Io { path: path.to_path_buf(), source })?;
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
        if status.success() {
            return Ok(());
        }
        let tail = self.stderr.lock().map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
        Err(SourceError::Ffmpeg {
            path: path.to_path_buf(),
            reason: if tail.is_empty() { format!("it exited with {status}") } else { format!("{status}: {tail}") },
        })
    }
}

impl Drop for Ffmpeg {
    fn drop(&mut self) {
        // Stopped early (a --limit, an error): do not leave a decoder running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

/// A video read in order: Y4M natively, anything else decoded by ffmpeg into a Y4M pipe.
pub struct VideoSource {
    path: PathBuf,
    // Declared before `ffmpeg` so that the pipe closes before the process is reaped.
    reader: Y4mReader<Box<dyn Read + Send>>,
    ffmpeg: Option<Ffmpeg>,
    next_index: usize,
    done: bool,
}

impl VideoSource {
    /// Opens `path`: a file starting with `YUV4MPEG2` is read directly; any other is decoded
    /// by running `ffmpeg` (the program given) as `ffmpeg -i PATH -f yuv4mpegpipe -pix_fmt
    /// yuv420p -`, streaming its output.
    pub fn open(path: &Path, ffmpeg: &OsStr) -> Result<VideoSource, SourceError> {
        let io = |source| SourceError::Io { path: path.to_path_buf(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut magic = [0u8; 9];
        let n = read_full(&mut file, &mut magic).map_err(io)?;
        if n == magic.len() && &magic == b"YUV4MPEG2" {
            let file = std::fs::File::open(path).map_err(io)?;
            let reader = Y4mReader::new(Box::new(file) as Box<dyn Read + Send>, path)?;
            return Ok(VideoSource { path: path.to_path_buf(), reader, ffmpeg: None, next_index: 0, done: false });
        }
        drop(file);
        // `file:` keeps ffmpeg from reading a path with a colon, or one starting with '-', as
        // a protocol or an option.
        let mut input = OsString::from("file:");
        input.push(path.as_os_str());
        let spawned = Command::new(ffmpeg)
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-i"])
            .arg(&input)
            .args(["-f", "yuv4mpegpipe", "-pix_fmt", "yuv420p", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::FfmpegMissing {
                    path: path.to_path_buf(),
                    program: ffmpeg.to_os_string(),
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                return Err(SourceError::Ffmpeg {
                    path: path.to_path_buf(),
                    reason: format!("cannot start `{}`: {e}", ffmpeg.to_string_lossy()),
                });
            }
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // Drained on a thread: a full stderr pipe would otherwise stall ffmpeg and the stream.
        let drain = child.stderr.take().map(|mut pipe| {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.extend_from_slice(&buf[..n]);
                        let excess = s.len().saturating_sub(STDERR_TAIL);
                        s.drain(..excess);
                    }
                }
            })
        });
        let stdout = child.stdout.take();
        let mut ff = Ffmpeg { child, stderr, drain };
        let Some(stdout) = stdout else {
            return Err(SourceError::Ffmpeg { path: path.to_path_buf(), reason: "no output pipe".into() });
        };
        let origin = PathBuf::from(format!("{} (decoded by ffmpeg)", path.display()));
        match Y4mReader::new(Box::new(stdout) as Box<dyn Read + Send>, &origin) {
            Ok(reader) => {
                Ok(VideoSource { path: path.to_path_buf(), reader, ffmpeg: Some(ff), next_index: 0, done: false })
            }
            // Most often ffmpeg could not read the file: its own message says why.
            Err(e) => Err(ff.finish(path).err().unwrap_or(e)),
        }
    }

    /// The stream header (for a decoded video, that of ffmpeg's Y4M output).
    pub fn header(&self) -> &Y4mHeader {
        self.reader.header()
    }

    fn next_frame(&mut self) -> Option<Result<Sample, SourceError>> {
        if self.done {
            return None;
        }
        let failure = match self.reader.read_frame() {
            Some(Ok(frame)) => {
                let index = self.next_index;
                self.next_index += 1;
                return Some(Ok(Sample { index, frame, label: None, name: None }));
            }
            Some(Err(e)) => Some(e),
            None => None,
        };
        self.done = true;
        // A failing ffmpeg shows up as a short or empty pipe; its exit status and message are
        // the real error.
        match self.ffmpeg.as_mut().map(|f| f.finish(&self.path)) {
            Some(Err(e)) => Some(Err(e)),
            _ => failure.map(Err),
        }
    }
}

impl std::fmt::Debug for VideoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VideoSource({}, {:?})", self.path.display(), self.reader.header())
    }
}
