//! Frame sources: IDX (raw and gzip), folders of images (class sub-folders, labels files), Y4M
//! (parsed natively, and through a stand-in ffmpeg), and their error messages. Every expected
//! value is built independently of the reader (bytes written by hand, the image crate's PNG
//! encoder, the IDX layout read straight from the file).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use acclimate::stream::frame::{PixelFormat, YuvRange};
use acclimate_cli::stream::source::{Sample, Source, SourceError, Y4mChroma, Y4mReader, write_y4m};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "acclimate-stream-source-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

/// An IDX file of unsigned bytes, laid out by hand: 00 00 08 rank, big-endian dims, data.
fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn err_text<T: std::fmt::Debug>(r: Result<T, SourceError>) -> String {
    r.expect_err("expected an error").to_string()
}

fn all(source: &mut Source) -> Vec<Result<Sample, SourceError>> {
    std::iter::from_fn(|| source.next_frame()).collect()
}

// ---------------------------------------------------------------------------------------------
// IDX

/// Three 2×3 gray images with distinct bytes, and their labels.
fn gray_set() -> (Vec<u8>, Vec<u8>) {
    ((0u8..18).map(|i| i * 13 + 1).collect(), vec![7, 0, 255])
}

fn check_gray_set(source: &mut Source) {
    let (pixels, labels) = gray_set();
    assert_eq!(source.len(), Some(3));
    assert_eq!(source.labels(), Some(labels.iter().map(|&l| l as u32).collect()));
    for i in [2usize, 0, 1] {
        let s = source.get(i).unwrap();
        assert_eq!(s.index, i);
        assert_eq!(s.label, Some(labels[i] as u32));
        assert_eq!((s.frame.width, s.frame.height, s.frame.format), (3, 2, PixelFormat::Gray8));
        assert_eq!(s.frame.data, pixels[i * 6..(i + 1) * 6]);
        s.frame.validate().unwrap();
    }
    let seq = all(source);
    assert_eq!(seq.len(), 3);
    for (i, s) in seq.into_iter().enumerate() {
        let s = s.unwrap();
        assert_eq!((s.index, s.frame.data.clone()), (i, pixels[i * 6..(i + 1) * 6].to_vec()));
    }
    let e = err_text(source.get(3));
    assert!(e.contains("sample 3") && e.contains("3 samples"), "{e}");
}

#[test]
fn idx_raw_round_trip() {
    let d = TempDir::new("idx-raw");
    let (pixels, labels) = gray_set();
    write(&d.path("images-idx3-ubyte"), &idx_bytes(&[3, 2, 3], &pixels));
    write(&d.path("labels-idx1-ubyte"), &idx_bytes(&[3], &labels));
    let spec = format!("idx:{},{}", d.path("images-idx3-ubyte").display(), d.path("labels-idx1-ubyte").display());
    check_gray_set(&mut Source::open(&spec).unwrap());
    // Without labels.
    let mut s = Source::open(&format!("idx:{}", d.path("images-idx3-ubyte").display())).unwrap();
    assert_eq!(s.labels(), None);
    assert_eq!(s.get(1).unwrap().label, None);
}

#[test]
fn idx_gzip_detected_by_magic_not_name() {
    let d = TempDir::new("idx-gz");
    let (pixels, labels) = gray_set();
    // Names without .gz: the magic bytes decide. One labels file is raw, to mix both.
    write(&d.path("images.idx"), &gzip(&idx_bytes(&[3, 2, 3], &pixels)));
    write(&d.path("labels.idx"), &idx_bytes(&[3], &labels));
    let spec = format!("idx:{},{}", d.path("images.idx").display(), d.path("labels.idx").display());
    check_gray_set(&mut Source::open(&spec).unwrap());
    write(&d.path("labels.gz"), &gzip(&idx_bytes(&[3], &labels)));
    let spec = format!("idx:{},{}", d.path("images.idx").display(), d.path("labels.gz").display());
    check_gray_set(&mut Source::open(&spec).unwrap());
}

#[test]
fn idx_rank4_rgb_and_single_channel() {
    let d = TempDir::new("idx-rgb");
    let pixels: Vec<u8> = (0u8..24).map(|i| 255 - i * 7).collect();
    write(&d.path("rgb"), &idx_bytes(&[2, 2, 2, 3], &pixels));
    let mut s = Source::open(&format!("idx:{}", d.path("rgb").display())).unwrap();
    let f = s.get(1).unwrap().frame;
    assert_eq!((f.width, f.height, f.format), (2, 2, PixelFormat::Rgb8));
    assert_eq!(f.data, pixels[12..24]);
    f.validate().unwrap();
    write(&d.path("gray4"), &idx_bytes(&[2, 3, 2, 1], &pixels[..12]));
    let mut s = Source::open(&format!("idx:{}", d.path("gray4").display())).unwrap();
    let f = s.get(0).unwrap().frame;
    assert_eq!((f.width, f.height, f.format), (2, 3, PixelFormat::Gray8));
    assert_eq!(f.data, pixels[..6]);
}

#[test]
fn idx_errors_name_the_problem() {
    let d = TempDir::new("idx-err");
    let (pixels, labels) = gray_set();
    let open = |name: &str, bytes: &[u8]| {
        write(&d.path(name), bytes);
        err_text(Source::open(&format!("idx:{}", d.path(name).display())))
    };
    let e = open("magic", &[0x12, 0x34, 0x08, 0x03, 0, 0, 0, 1]);
    assert!(e.contains("not an IDX file") && e.contains("12 34 08 03") && e.contains("magic"), "{e}");
    let e = open("float", &[0, 0, 0x0d, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert!(e.contains("0x0d") && e.contains("float32") && e.contains("unsigned byte"), "{e}");
    let e = open("empty", &[]);
    assert!(e.contains("0 bytes"), "{e}");
    let e = open("short-header", &[0, 0, 8, 3, 0, 0, 0, 3, 0, 0]);
    assert!(e.contains("truncated IDX header"), "{e}");
    let full = idx_bytes(&[3, 2, 3], &pixels);
    let e = open("truncated", &full[..full.len() - 1]);
    assert!(e.contains("truncated IDX data") && e.contains("need 18 bytes") && e.contains("has 17"), "{e}");
    let e = open("trailing", &[full.as_slice(), &[0]].concat());
    assert!(e.contains("bytes after the 18 data bytes"), "{e}");
    // A gzip stream cut short: the decoder's own complaint, naming the file.
    let gz = gzip(&full);
    let e = open("cut.gz", &gz[..gz.len() / 2]);
    assert!(e.contains("cut.gz"), "{e}");
    let e = open("rank2", &idx_bytes(&[3, 6], &pixels));
    assert!(e.contains("[n, h, w]") && e.contains("[3, 6]"), "{e}");
    let e = open("rgb4", &idx_bytes(&[1, 2, 2, 4], &pixels[..16]));
    assert!(e.contains("[1, 2, 2, 4]"), "{e}");
    let e = open("huge", &[0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    assert!(e.contains("truncated") || e.contains("overflow"), "{e}");

    // Count mismatch and labels of the wrong rank.
    write(&d.path("imgs"), &full);
    write(&d.path("two-labels"), &idx_bytes(&[2], &labels[..2]));
    write(&d.path("labels-2d"), &idx_bytes(&[3, 1], &labels));
    let e = err_text(Source::open(&format!("idx:{},{}", d.path("imgs").display(), d.path("two-labels").display())));
    assert!(e.contains("2 labels for 3 images"), "{e}");
    let e = err_text(Source::open(&format!("idx:{},{}", d.path("imgs").display(), d.path("labels-2d").display())));
    assert!(e.contains("one dimension"), "{e}");
    let e = err_text(Source::open(&format!("idx:{}", d.path("missing").display())));
    assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
}

#[test]
fn bad_specs_are_errors() {
    for (spec, needle) in [
        ("assets/x.idx", "expected idx:"),
        ("camera:0", "unknown kind 'camera'"),
        ("idx:", "path is empty"),
        ("idx:a,", "idx:IMAGES,LABELS"),
        ("dir:", "path is empty"),
    ] {
        let e = err_text(Source::open(spec));
        assert!(e.contains(needle) && e.contains(spec), "{spec}: {e}");
    }
}

/// The first MNIST test digits and labels, against the IDX layout read straight from the files.
#[test]
fn mnist_t10k_first_samples() {
    let images = common::asset("mnist/t10k-images-idx3-ubyte");
    let labels = common::asset("mnist/t10k-labels-idx1-ubyte");
    let mut s = Source::open(&format!("idx:{},{}", images.display(), labels.display())).unwrap();
    assert_eq!(s.len(), Some(10_000));
    let raw_images = std::fs::read(&images).unwrap();
    let raw_labels = std::fs::read(&labels).unwrap();
    // The well-known first ten test labels.
    assert_eq!(&s.labels().unwrap()[..10], &[7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    for i in [0usize, 1, 9999] {
        let sample = s.get(i).unwrap();
        assert_eq!((sample.frame.width, sample.frame.height, sample.frame.format), (28, 28, PixelFormat::Gray8));
        assert_eq!(sample.frame.data, raw_images[16 + i * 784..16 + (i + 1) * 784]);
        assert_eq!(sample.label, Some(raw_labels[8 + i] as u32));
    }
}

// ---------------------------------------------------------------------------------------------
// Folders

fn rgb_png(path: &Path, w: u32, h: u32, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_raw(w, h, data.clone()).unwrap().save(path).unwrap();
    data
}

fn gray_png(path: &Path, w: u32, h: u32, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..w * h).map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed)).collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_raw(w, h, data.clone()).unwrap().save(path).unwrap();
    data
}

#[test]
fn dir_labels_from_named_subfolders() {
    let d = TempDir::new("dir-sub");
    let root = d.path("data");
    let b = rgb_png(&root.join("dog/b.png"), 3, 2, 5);
    let a = rgb_png(&root.join("cat/z.png"), 2, 2, 1);
    let g = gray_png(&root.join("dog/a.PNG"), 2, 3, 9);
    // Not images: ignored. Hidden files too.
    write(&root.join("README"), b"not an image");
    write(&root.join("cat/.hidden.png"), b"junk");
    let mut s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.len(), Some(3));
    // Sorted by path: cat/z.png, dog/a.PNG, dog/b.png; classes sorted: cat 0, dog 1.
    assert_eq!(s.labels(), Some(vec![0, 1, 1]));
    assert_eq!(s.class_names(), Some(&["cat".to_string(), "dog".to_string()][..]));
    let s0 = s.get(0).unwrap();
    assert_eq!(s0.name.as_deref(), Some("cat/z.png"));
    assert_eq!((s0.frame.format, s0.frame.width, s0.frame.height), (PixelFormat::Rgb8, 2, 2));
    assert_eq!(s0.frame.data, a);
    let s1 = s.get(1).unwrap();
    assert_eq!((s1.frame.format, s1.frame.width, s1.frame.height), (PixelFormat::Gray8, 2, 3));
    assert_eq!(s1.frame.data, g);
    let s2 = s.get(2).unwrap();
    assert_eq!((s2.frame.data.clone(), s2.label, s2.name.as_deref()), (b, Some(1), Some("dog/b.png")));
}

#[test]
fn dir_integer_subfolders_are_the_ids() {
    let d = TempDir::new("dir-int");
    let root = d.path("digits");
    gray_png(&root.join("3/x.png"), 2, 2, 0);
    gray_png(&root.join("10/y.png"), 2, 2, 0);
    gray_png(&root.join("10/z.png"), 2, 2, 0);
    let s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.labels(), Some(vec![10, 10, 3]));
    assert_eq!(s.class_names(), None);
}

#[test]
fn dir_labels_csv() {
    let d = TempDir::new("dir-csv");
    let root = d.path("imgs");
    let p0 = rgb_png(&root.join("b.png"), 2, 2, 3);
    rgb_png(&root.join("a.png"), 2, 2, 4);
    // A JPEG that is really a PNG still decodes: the content decides.
    let p2 = rgb_png(&root.join("tmp.png"), 2, 1, 7);
    std::fs::rename(root.join("tmp.png"), root.join("c.jpg")).unwrap();
    write(&root.join("labels.csv"), b"filename,label\n# a comment\nb.png,bird\n\na.png, ant\n./c.jpg,cow\n");
    let mut s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.labels(), Some(vec![0, 1, 2]));
    assert_eq!(s.class_names().unwrap(), &["ant", "bird", "cow"]);
    assert_eq!(s.get(1).unwrap().frame.data, p0);
    assert_eq!(s.get(2).unwrap().frame.data, p2);

    // Integer labels are the ids; no header.
    write(&root.join("labels.csv"), b"a.png,4\nb.png,2\nc.jpg,4\n");
    let s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.labels(), Some(vec![4, 2, 4]));

    // Problems, each named.
    let check = |csv: &[u8], needle: &str| {
        write(&root.join("labels.csv"), csv);
        let e = err_text(Source::open(&format!("dir:{}", root.display())));
        assert!(e.contains(needle) && e.contains("labels.csv"), "{e}");
    };
    check(b"a.png,1\nb.png,2\n", "no label for image 'c.jpg'");
    check(b"a.png,1\nb.png,2\nc.jpg,3\nd.png,4\n", "line 4: 'd.png' is not a PNG or JPEG image");
    check(b"a.png,1\nb.png,2\nc.jpg,3\na.png,4\n", "line 4: a second label for 'a.png'");
    check(b"a.png,1\nb.png\n", "line 2");
    check(b"a.png,1\nb.png,\nc.jpg,3\n", "line 2: 'b.png' has an empty label");
    write(&root.join("labels.csv"), b"a.png,1\nb.png,2\nc.jpg,3\n");
    write(&root.join("labels.txt"), b"a.png 1\n");
    let e = err_text(Source::open(&format!("dir:{}", root.display())));
    assert!(e.contains("both labels.csv and labels.txt"), "{e}");
    // labels.txt alone, whitespace-separated.
    std::fs::remove_file(root.join("labels.csv")).unwrap();
    write(&root.join("labels.txt"), b"a.png 1\nb.png\t0\nc.jpg 1\n");
    let s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.labels(), Some(vec![1, 0, 1]));
}

#[test]
fn dir_bad_image_is_an_error_for_that_frame_only() {
    let d = TempDir::new("dir-bad");
    let root = d.path("imgs");
    rgb_png(&root.join("a.png"), 2, 2, 0);
    write(&root.join("b.png"), b"\x89PNG\r\n\x1a\n but not really");
    let c = rgb_png(&root.join("c.png"), 2, 2, 9);
    let mut s = Source::open(&format!("dir:{}", root.display())).unwrap();
    assert_eq!(s.labels(), None);
    let seq = all(&mut s);
    assert_eq!(seq.len(), 3);
    assert!(seq[0].is_ok());
    let e = seq[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("cannot decode image") && e.contains("b.png"), "{e}");
    assert_eq!(seq[2].as_ref().unwrap().frame.data, c);
}

#[test]
fn dir_layout_errors() {
    let d = TempDir::new("dir-layout");
    let root = d.path("mixed");
    rgb_png(&root.join("top.png"), 2, 2, 0);
    rgb_png(&root.join("cls/x.png"), 2, 2, 0);
    let e = err_text(Source::open(&format!("dir:{}", root.display())));
    assert!(e.contains("both in class sub-folders and at the top level") && e.contains("top.png"), "{e}");
    std::fs::create_dir_all(d.path("empty")).unwrap();
    write(&d.path("empty/notes.txt"), b"x");
    let e = err_text(Source::open(&format!("dir:{}", d.path("empty").display())));
    assert!(e.contains("no PNG or JPEG images"), "{e}");
    let e = err_text(Source::open(&format!("dir:{}", d.path("nowhere").display())));
    assert!(e.contains("cannot read") && e.contains("nowhere"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Y4M

fn frames_of(source: &mut Source) -> Vec<acclimate::stream::frame::Frame> {
    all(source).into_iter().map(|s| s.unwrap().frame).collect()
}

/// Two 4×2 4:2:0 frames written byte by byte: Y is 8 bytes, U and V 2 each.
#[test]
fn y4m_handmade_420_planes_and_timestamps() {
    let d = TempDir::new("y4m-420");
    let mut bytes = b"YUV4MPEG2 W4 H2 F25:1 Ip A1:1 C420jpeg XYSCSS=420JPEG\n".to_vec();
    let f0: Vec<u8> = (10..22).collect();
    let f1: Vec<u8> = (100..112).collect();
    bytes.extend_from_slice(b"FRAME\n");
    bytes.extend_from_slice(&f0);
    bytes.extend_from_slice(b"FRAME Ixyz\n");
    bytes.extend_from_slice(&f1);
    write(&d.path("clip.y4m"), &bytes);
    let mut s = Source::open(&format!("video:{}", d.path("clip.y4m").display())).unwrap();
    assert_eq!(s.len(), None);
    assert_eq!(s.labels(), None);
    let e = err_text(s.get(0));
    assert!(e.contains("read in order"), "{e}");
    let frames = frames_of(&mut s);
    assert_eq!(frames.len(), 2);
    for (f, want, ts) in [(&frames[0], &f0, 0i64), (&frames[1], &f1, 40_000)] {
        assert_eq!((f.width, f.height, f.format, f.timestamp_us), (4, 2, PixelFormat::I420, ts));
        assert_eq!(f.yuv_range, YuvRange::Video);
        f.validate().unwrap();
        let plane = |i: usize, n: usize| {
            let p = f.planes[i];
            (0..n).map(|k| f.data[p.offset + (k / p.row_stride) * p.row_stride + k % p.row_stride]).collect::<Vec<_>>()
        };
        assert_eq!(plane(0, 8), want[..8]);
        assert_eq!(plane(1, 2), want[8..10]);
        assert_eq!(plane(2, 2), want[10..12]);
        assert_eq!((f.planes[1].row_stride, f.planes[2].row_stride), (2, 2));
    }
    assert!(s.next_frame().is_none());
}

#[test]
fn y4m_write_read_round_trip_odd_size_ntsc_rate() {
    let d = TempDir::new("y4m-rt");
    // 5×3: chroma planes are 3×2 (rounded up).
    let frames: Vec<_> = (0..4u8)
        .map(|k| {
            let data: Vec<u8> = (0..15 + 2 * 6).map(|i| (i as u8).wrapping_mul(7).wrapping_add(k * 50)).collect();
            acclimate::stream::frame::Frame::i420(5, 3, data)
        })
        .collect();
    write_y4m(&d.path("rt.y4m"), (30000, 1001), &frames).unwrap();
    let header = std::fs::read(d.path("rt.y4m")).unwrap();
    assert!(header.starts_with(b"YUV4MPEG2 W5 H3 F30000:1001 "), "{:?}", String::from_utf8_lossy(&header[..40]));
    assert_eq!(header.len(), header.iter().position(|&b| b == b'\n').unwrap() + 1 + 4 * (6 + 27));
    let mut s = Source::open(&format!("video:{}", d.path("rt.y4m").display())).unwrap();
    let got = frames_of(&mut s);
    assert_eq!(got.len(), 4);
    for (k, (g, want)) in got.iter().zip(&frames).enumerate() {
        assert_eq!(g.data, want.data);
        assert_eq!(g.planes, want.planes);
        // ⌊k · 1001 / 30000 s⌋ in µs: 0, 33366, 66733, 100100.
        assert_eq!(g.timestamp_us, [0, 33_366, 66_733, 100_100][k]);
    }
    // A full-range frame is written and read back as full range.
    let full = vec![frames[0].clone().with_yuv(Default::default(), YuvRange::Full)];
    write_y4m(&d.path("full.y4m"), (1, 1), &full).unwrap();
    let mut s = Source::open(&format!("video:{}", d.path("full.y4m").display())).unwrap();
    assert_eq!(frames_of(&mut s)[0].yuv_range, YuvRange::Full);
}

#[test]
fn y4m_mono_422_444_become_i420() {
    let parse = |header: &str, data: &[u8]| {
        let mut bytes = format!("{header}\nFRAME\n").into_bytes();
        bytes.extend_from_slice(data);
        let mut r = Y4mReader::new(std::io::Cursor::new(bytes), Path::new("mem.y4m")).unwrap();
        let chroma = r.header().chroma;
        let f = r.read_frame().unwrap().unwrap();
        assert!(r.read_frame().is_none());
        (chroma, f)
    };
    // 3×3 mono: chroma 2×2 of 128.
    let y: Vec<u8> = (1..=9).collect();
    let (c, f) = parse("YUV4MPEG2 W3 H3 F1:1 Cmono", &y);
    assert_eq!(c, Y4mChroma::Mono);
    assert_eq!(f.data, [y.clone(), vec![128; 8]].concat());
    f.validate().unwrap();
    // 3×3 4:4:4: each chroma sample is the rounded mean of its (partial) 2×2 block.
    let u: Vec<u8> = vec![10, 20, 30, 40, 50, 60, 70, 80, 91];
    let v: Vec<u8> = vec![0, 1, 0, 1, 0, 1, 255, 254, 3];
    let (c, f) = parse("YUV4MPEG2 W3 H3 F1:1 C444", &[y.clone(), u, v].concat());
    assert_eq!(c, Y4mChroma::C444);
    // U blocks: {10,20,40,50}→30, {30,60}→45, {70,80}→75, {91}→91.
    // V blocks: {0,1,1,0}→0.5→1 (half rounds up), {0,1}→1, {255,254}→254.5→255, {3}→3.
    assert_eq!(f.data, [y.clone(), vec![30, 45, 75, 91], vec![1, 1, 255, 3]].concat());
    // 4×3 4:2:2: chroma 2 wide, 3 high; vertical pairs averaged.
    let y: Vec<u8> = (0..12).collect();
    let u: Vec<u8> = vec![10, 20, 12, 23, 99, 7];
    let v: Vec<u8> = vec![1, 2, 3, 4, 5, 6];
    let (c, f) = parse("YUV4MPEG2 W4 H3 F1:1 C422", &[y.clone(), u, v].concat());
    assert_eq!(c, Y4mChroma::C422);
    // U: (10+12)/2=11, (20+23)/2=21.5→22, 99, 7; V: 2, 3, 5, 6.
    assert_eq!(f.data, [y, vec![11, 22, 99, 7], vec![2, 3, 5, 6]].concat());
    // Colour space absent: 4:2:0 (the format's default); 420paldv and 420mpeg2 are 4:2:0.
    for h in
        ["YUV4MPEG2 W2 H2 F1:1", "YUV4MPEG2 W2 H2 F1:1 C420paldv", "YUV4MPEG2 W2 H2 F1:1 C420mpeg2 XCOLORRANGE=LIMITED"]
    {
        let (c, f) = parse(h, &[1, 2, 3, 4, 5, 6]);
        assert_eq!((c, f.data.as_slice(), f.yuv_range), (Y4mChroma::C420, &[1u8, 2, 3, 4, 5, 6][..], YuvRange::Video));
    }
}

#[test]
fn y4m_bad_headers_and_frames() {
    let d = TempDir::new("y4m-bad");
    let open = |name: &str, bytes: &[u8]| {
        write(&d.path(name), bytes);
        Source::open(&format!("video:{}", d.path(name).display()))
    };
    for (header, needle) in [
        ("YUV4MPEG2 H2 F25:1", "no width (W)"),
        ("YUV4MPEG2 W2 F25:1", "no height (H)"),
        ("YUV4MPEG2 W2 H2", "no frame rate (F)"),
        ("YUV4MPEG2 W0 H2 F25:1", "width '0'"),
        ("YUV4MPEG2 Wx H2 F25:1", "width 'x'"),
        ("YUV4MPEG2 W2 H99999 F25:1", "height '99999'"),
        ("YUV4MPEG2 W2 H2 F25:0", "F25:0"),
        ("YUV4MPEG2 W2 H2 F25", "F25"),
        ("YUV4MPEG2 W2 H2 F25:1 C420p10", "C420p10 is not supported"),
        ("YUV4MPEG2W2 H2 F25:1", "must start with 'YUV4MPEG2 '"),
    ] {
        let e = err_text(open("h.y4m", format!("{header}\nFRAME\n\0\0\0\0\0\0").as_bytes()));
        assert!(e.contains(needle) && e.contains("h.y4m"), "{header}: {e}");
    }
    let e = err_text(open("nl.y4m", &[b"YUV4MPEG2 W2 H2 F25:1 ".as_slice(), &[b'X'; 5000]].concat()));
    assert!(e.contains("not terminated"), "{e}");

    // A truncated last frame: the good frame, then an error naming the frame, then the end.
    let good = b"YUV4MPEG2 W2 H2 F25:1\nFRAME\n\x01\x02\x03\x04\x05\x06";
    let mut s = open("trunc.y4m", &[good.as_slice(), b"FRAME\n\x01\x02"].concat()).unwrap();
    assert!(s.next_frame().unwrap().is_ok());
    let e = s.next_frame().unwrap().unwrap_err().to_string();
    assert!(e.contains("frame 1: truncated, 2 of its 6 bytes"), "{e}");
    assert!(s.next_frame().is_none());
    // Garbage where a marker should be.
    let mut s = open("marker.y4m", &[good.as_slice(), b"FRAMES\n\x01\x02\x03\x04\x05\x06"].concat()).unwrap();
    assert!(s.next_frame().unwrap().is_ok());
    let e = s.next_frame().unwrap().unwrap_err().to_string();
    assert!(e.contains("frame 1: expected a FRAME marker"), "{e}");
    assert!(s.next_frame().is_none());
}

/// The Y4M clip of the assets: every frame is there, with its size and timestamps.
#[test]
fn y4m_asset_clip() {
    let clip = common::asset("video/carphone_pristine.y4m");
    let bytes = std::fs::read(&clip).unwrap();
    let header_len = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    let header = String::from_utf8_lossy(&bytes[..header_len]).to_string();
    let w: usize = header.split(' ').find_map(|t| t.strip_prefix('W')).unwrap().parse().unwrap();
    let h: usize = header.split(' ').find_map(|t| t.strip_prefix('H')).unwrap().trim().parse().unwrap();
    let frame_len = 6 + w * h * 3 / 2;
    let expected = (bytes.len() - header_len) / frame_len;
    assert_eq!((bytes.len() - header_len) % frame_len, 0);
    let mut s = Source::open(&format!("video:{}", clip.display())).unwrap();
    let mut n = 0;
    while let Some(f) = s.next_frame() {
        let f = f.unwrap();
        assert_eq!((f.index, f.frame.width as usize, f.frame.height as usize), (n, w, h));
        let start = header_len + n * frame_len + 6;
        assert_eq!(f.frame.data, bytes[start..start + w * h * 3 / 2]);
        n += 1;
    }
    assert_eq!(n, expected);
}

// ---------------------------------------------------------------------------------------------
// Other containers through ffmpeg

#[test]
fn ffmpeg_missing_says_what_to_do() {
    let d = TempDir::new("noffmpeg");
    write(&d.path("clip.mp4"), b"\0\0\0\x18ftypmp42 not a y4m");
    let e = err_text(Source::open_video(&d.path("clip.mp4"), "acclimate-no-such-ffmpeg".as_ref()));
    assert!(e.contains("clip.mp4") && e.contains("acclimate-no-such-ffmpeg"), "{e}");
    assert!(e.contains("install ffmpeg") && e.contains(".y4m"), "{e}");
}

/// A stand-in for ffmpeg (a shell script) checks the pipe, the arguments and the failure path
/// without needing ffmpeg installed: it writes the file's bytes after a 4-byte prefix, which
/// makes the file itself not Y4M.
#[cfg(unix)]
#[test]
fn non_y4m_video_streams_through_ffmpeg_pipe() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = TempDir::new("fakeffmpeg");
    let frames: Vec<_> = (0..3u8).map(|k| acclimate::stream::frame::Frame::i420(4, 4, vec![k * 40 + 1; 24])).collect();
    write_y4m(&d.path("src.y4m"), (24, 1), &frames).unwrap();
    write(&d.path("clip.mkv"), &[b"MKV!".as_slice(), &std::fs::read(d.path("src.y4m")).unwrap()].concat());
    let script = d.path("fake-ffmpeg");
    write(
        &script,
        b"#!/bin/sh\n\
          # Checks the arguments a real ffmpeg would get, then emits the Y4M after the prefix.\n\
          echo \"$*\" > \"$(dirname \"$0\")/args\"\n\
          while [ $# -gt 0 ]; do if [ \"$1\" = -i ]; then shift; f=\"${1#file:}\"; fi; shift; done\n\
          case \"$f\" in *broken*) echo 'moov atom not found' >&2; exit 1;; esac\n\
          tail -c +5 \"$f\"\n",
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = Source::open_video(&d.path("clip.mkv"), script.as_os_str()).unwrap();
    let got = frames_of(&mut s);
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&frames) {
        assert_eq!(g.data, w.data);
    }
    assert_eq!(got[2].timestamp_us, 83_333);
    let args = std::fs::read_to_string(d.path("args")).unwrap();
    assert!(args.contains("-f yuv4mpegpipe -pix_fmt yuv420p -"), "{args}");
    assert!(args.contains(&format!("-i file:{}", d.path("clip.mkv").display())), "{args}");

    // ffmpeg failing: its message is the error.
    write(&d.path("broken.mp4"), b"junk");
    let e = err_text(Source::open_video(&d.path("broken.mp4"), script.as_os_str()));
    assert!(e.contains("ffmpeg failed") && e.contains("moov atom not found") && e.contains("broken.mp4"), "{e}");
}

/// With a real ffmpeg on the PATH: a lossless re-encode reads back exactly. Skipped (with a
/// message) when ffmpeg is not installed; the pipe itself is covered by the stand-in above.
#[test]
fn real_ffmpeg_round_trip_when_installed() {
    let ok = std::process::Command::new("ffmpeg")
        .arg("-version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: ffmpeg is not installed");
        return;
    }
    let d = TempDir::new("realffmpeg");
    let frames: Vec<_> = (0..3u8)
        .map(|k| {
            acclimate::stream::frame::Frame::i420(8, 6, (0..72).map(|i| (i as u8 * 3).wrapping_add(k * 9)).collect())
        })
        .collect();
    write_y4m(&d.path("src.y4m"), (25, 1), &frames).unwrap();
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-i"])
        .arg(d.path("src.y4m"))
        .args(["-c:v", "ffv1"])
        .arg(d.path("clip.mkv"))
        .status()
        .unwrap();
    assert!(status.success());
    let mut s = Source::open(&format!("video:{}", d.path("clip.mkv").display())).unwrap();
    let got = frames_of(&mut s);
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(&frames) {
        assert_eq!(g.data, w.data);
    }
}
